"""GAMENet/SafeDrug pickles: the community format imports; code-carrying or malformed pickles are refused.

The fixtures are written here: ``records_final.pkl`` (patients as lists of [diag, proc, med] id
lists), ``voc_final.pkl`` (a dict of three ``Voc`` objects, stored by value the way ``dill``
stores classes defined in ``__main__``) and ``ddi_A_final.pkl`` (a numpy 0/1 matrix).
"""

import io
import os
import pickle
import sys
import types

import numpy as np
import pytest

from ehrflow.records.errors import RecordError
from ehrflow.training.medrec_data import import_gamenet
from ehrflow.training.safe_pickle import UnsafePickleError, Voc, safe_load


class _FakeDill(types.ModuleType):
    """Functions named like dill's loaders, so the pickle names ``dill._dill`` globals exactly as dill-made files do."""

    def __init__(self) -> None:
        super().__init__("dill._dill")
        for name in ("_create_type", "_load_type", "_create_function", "_create_code"):
            fn = types.FunctionType((lambda *a: None).__code__, {}, name)
            fn.__module__, fn.__qualname__ = "dill._dill", name
            setattr(self, name, fn)


class GamenetVoc:
    """The shape of GAMENet's ``Voc`` (two dicts)."""

    def __init__(self, words):
        self.idx2word = dict(enumerate(words))
        self.word2idx = {w: i for i, w in enumerate(words)}


def _dill_style_dumps(obj, fake: _FakeDill) -> bytes:
    """Pickle ``obj`` with ``GamenetVoc`` stored by value, as dill does for a class defined in ``__main__``."""
    code = types.SimpleNamespace()
    function = types.SimpleNamespace()

    class Pickler(pickle.Pickler):
        def reducer_override(self, o):
            if o is GamenetVoc:
                namespace = {"__module__": "__main__", "__init__": function}
                return fake._create_type, (fake._load_type("type"), "Voc", (object,), namespace)
            if o is function:
                return fake._create_function, (code, {}, "__init__")
            if o is code:
                return fake._create_code, (2, 0, 0, 2, 3, 67, b"|\x00\x90\x00", (), (), ("self",), "voc.py", "__init__")
            return NotImplemented

    buf = io.BytesIO()
    saved = {k: sys.modules.get(k) for k in ("dill", "dill._dill")}
    sys.modules["dill"], sys.modules["dill._dill"] = types.ModuleType("dill"), fake
    try:
        Pickler(buf, protocol=4).dump(obj)
    finally:
        for key, module in saved.items():
            if module is None:
                del sys.modules[key]
            else:
                sys.modules[key] = module
    return buf.getvalue()


@pytest.fixture
def gamenet_dir(tmp_path):
    fake = _FakeDill()
    vocs = {
        "diag_voc": GamenetVoc(["4019", "41401", "42731", "25000"]),
        "pro_voc": GamenetVoc(["3961", "8872"]),
        "med_voc": GamenetVoc(["N02B", "B01A", "C07A"]),
    }
    records = [
        [[[0, 1], [0], [0, 1]], [[2], [1], [1, 2]]],
        [[[3], [], [2]], [[0, 3], [0, 1], [0]], [[1], [1], [1]]],
    ]
    ddi = np.zeros((3, 3))
    ddi[1, 2] = ddi[2, 1] = 1
    (tmp_path / "voc_final.pkl").write_bytes(_dill_style_dumps(vocs, fake))
    (tmp_path / "records_final.pkl").write_bytes(pickle.dumps(records))
    (tmp_path / "ddi_A_final.pkl").write_bytes(pickle.dumps(ddi))
    return tmp_path


def test_gamenet_pickles_import(gamenet_dir):
    ds = import_gamenet(
        gamenet_dir / "records_final.pkl", gamenet_dir / "voc_final.pkl", gamenet_dir / "ddi_A_final.pkl"
    )
    assert ds.diag_vocab == ["<pad>", "<oov>", "4019", "41401", "42731", "25000"]
    assert ds.med_vocab == ["N02B", "B01A", "C07A"]
    assert len(ds.visits) == 2 and [len(v) for v in ds.visits] == [2, 3]
    assert ds.visits[0][0] == ([2, 3], [2], [0, 1])  # diagnosis/procedure ids shift by the two reserved entries
    assert ds.visits[1][0] == ([5], [], [2])
    assert ds.ddi is not None and ds.ddi[1, 2] == 1 and ds.ddi.sum() == 2
    vocs = safe_load(gamenet_dir / "voc_final.pkl")
    assert type(vocs["med_voc"]) is Voc  # the local stand-in, never the class stored in the file


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_that_executes_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "records_final.pkl"
    evil.write_bytes(pickle.dumps([_RunsCode()]))
    with pytest.raises(UnsafePickleError, match=r"refused global (posix|nt)\.system") as info:
        import_gamenet(evil, tmp_path / "voc_final.pkl")
    assert str(evil) in str(info.value)
    assert not (tmp_path / "PWNED").exists()


def test_dill_function_cannot_be_called(tmp_path):
    """A dill-stored function decodes to an inert value; calling it (REDUCE) is refused."""
    path = tmp_path / "voc_final.pkl"
    # protocol 0: f = dill._dill._create_function(None, None, None); f("argument")
    path.write_bytes(b"cdill._dill\n_create_function\n(NNNtR(S'argument'\ntR.")
    with pytest.raises(UnsafePickleError, match="malformed or disallowed"):
        safe_load(path)


def test_malformed_pickles_are_refused(tmp_path, gamenet_dir):
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps([[1, 2, 3]])[:-3])
    with pytest.raises(UnsafePickleError, match="truncated.pkl"):
        safe_load(truncated)
    bad_visit = tmp_path / "records_final.pkl"
    bad_visit.write_bytes(pickle.dumps([[[[0], [0], [0]], [[0], [9], [0]]]]))  # procedure id 9 is out of range
    with pytest.raises(RecordError, match="patient 0 visit 1") as info:
        import_gamenet(bad_visit, gamenet_dir / "voc_final.pkl")
    assert info.value.field == "proc"
