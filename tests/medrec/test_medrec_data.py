"""Med-rec dataset builder on the open EHR demos (MIMIC-IV, MIMIC-III, Synthea) and the drug mapping files."""

import datetime as dt
import itertools

import numpy as np
import pytest

from ehrflow.records.errors import ErrorSink, RecordError
from ehrflow.records.ingest import ingest_path
from ehrflow.records.loaders.mimic import Mimic3Loader
from ehrflow.records.loaders.synthea_csv import SyntheaCsvLoader
from ehrflow.records.model import Admission, Code, MedicationOrder, Note, Patient
from ehrflow.training.medrec_data import (
    OOV,
    PAD,
    DrugMapper,
    MedRecDataConfig,
    MedRecDataset,
    RepresentationConfig,
    build_dataset,
    build_from_store,
    build_representations,
    ndc11,
    read_ddi_pairs,
    split_by_patient,
)


@pytest.fixture(scope="module")
def medrec_dir(shared_data):
    return shared_data / "medrec"


@pytest.fixture(scope="module")
def mimic4_store(shared_data, tmp_path_factory):
    from ehrflow.records import PatientStore

    store = PatientStore(tmp_path_factory.mktemp("m4") / "patients.db")
    report = ingest_path(store, "mimic4", shared_data / "ehr" / "mimic4_demo")
    assert report.result.inserted == 100 and not report.rejected
    return store


@pytest.fixture(scope="module")
def mimic4_patients(mimic4_store):
    """Decoded once: the builder's own store path is covered by the first test."""
    return list(mimic4_store.iter_patients())


def _config(medrec_dir, **kw) -> MedRecDataConfig:
    return MedRecDataConfig(mapping_dir=medrec_dir, ddi_pairs=medrec_dir / "ddi_atc3_pairs.tsv", **kw)


def test_mimic4_demo_visits_vocab_and_ndc_coverage(mimic4_store, medrec_dir):
    ds = build_from_store(mimic4_store, _config(medrec_dir))
    r = ds.report
    assert r.patients_seen == 100 and r.patients_kept == len(ds.visits) == len(ds.patient_ids)
    assert 30 <= r.patients_kept < 100  # patients with >= 2 admissions that have diagnoses and mapped drugs
    assert all(len(v) >= 2 for v in ds.visits) and r.visits_kept == ds.n_visits
    assert sum(r.orders_by_route.values()) == r.orders_seen
    mapped = r.orders_seen - r.orders_dropped_unmapped
    assert r.orders_dropped_unmapped == r.orders_by_route.get("unmapped", 0)
    assert 0.6 < mapped / r.orders_seen < 0.95  # NDC on ~85% of rows; the GAMENet tables map most of those
    assert ds.diag_vocab[:2] == [PAD, OOV] and ds.proc_vocab[:2] == [PAD, OOV]
    assert all(len(m) == 4 and m[0].isalpha() for m in ds.med_vocab)  # ATC-3 classes, e.g. "N02B"
    assert all(k.startswith(("ICD9CM:", "ICD10CM:")) for k in ds.diag_vocab[2:])
    ids_in_range = all(
        max(d) < len(ds.diag_vocab) and max(m) < len(ds.med_vocab) and (not p or max(p) < len(ds.proc_vocab))
        for visits in ds.visits
        for d, p, m in visits
    )
    assert ids_in_range
    assert ds.ddi is not None and ds.ddi.shape == (len(ds.med_vocab),) * 2 and ds.ddi.sum() > 0
    assert np.array_equal(ds.ddi, ds.ddi.T)


def test_top_k_filters_count_oov_codes(mimic4_patients, medrec_dir):
    full = build_dataset(mimic4_patients, _config(medrec_dir))
    small = build_dataset(mimic4_patients, _config(medrec_dir, top_diag=20, top_proc=5, top_med=10))
    assert len(small.diag_vocab) == 22 and len(small.med_vocab) == 10
    diag_occurrences = sum(len(d) for visits in small.visits for d, _, _ in visits)
    in_vocab = sum(1 for visits in small.visits for d, _, _ in visits for i in d if i >= 2)
    assert small.report.diag_oov > 0 and small.report.proc_oov > 0
    # every out-of-vocabulary code is counted, and collapses into the one OOV id per visit
    assert diag_occurrences - in_vocab == sum(1 for visits in small.visits for d, _, _ in visits if 1 in d)
    assert small.report.med_dropped_outside_top_k > 0
    assert full.report.diag_oov == 0


def test_saved_dataset_round_trips_without_pickle(mimic4_patients, medrec_dir, tmp_path):
    ds = build_dataset(mimic4_patients, _config(medrec_dir, top_med=30))
    back = MedRecDataset.load(ds.save(tmp_path / "ds"))
    assert back.visits == ds.visits and back.med_vocab == ds.med_vocab
    assert np.array_equal(back.ddi, ds.ddi) and back.report == ds.report


MIMIC3_MEDREC_TABLES = ("ADMISSIONS", "PATIENTS", "DIAGNOSES_ICD", "PROCEDURES_ICD", "PRESCRIPTIONS", "D_ICD_DIAGNOSES")


def test_mimic3_demo(shared_data, medrec_dir, tmp_path):
    for table in MIMIC3_MEDREC_TABLES:  # only the tables med-rec reads: the chart events take seconds to parse
        (tmp_path / f"{table}.csv.gz").symlink_to(shared_data / "ehr" / "mimic3_demo" / f"{table}.csv.gz")
    loader = Mimic3Loader()
    unit = loader.units(tmp_path)[0]
    ds = build_dataset(loader.load(unit, ErrorSink()), _config(medrec_dir))
    assert ds.report.patients_seen == 100
    assert ds.report.patients_kept >= 6  # few demo patients have two admissions with drugs
    assert ds.report.orders_by_route.get("ndc-rxcui", 0) > ds.report.orders_dropped_unmapped
    assert all(len(m) == 4 for m in ds.med_vocab)


def test_synthea_uses_rxnorm_codes(shared_data, medrec_dir):
    loader = SyntheaCsvLoader()
    patients = [
        p for unit in loader.units(shared_data / "ehr" / "synthea" / "csv") for p in loader.load(unit, ErrorSink())
    ]
    ds = build_dataset(patients, _config(medrec_dir, unmapped_drugs="rxnorm-or-name"))
    routes = ds.report.orders_by_route
    assert routes.get("rxnorm", 0) > 0.5 * ds.report.orders_seen  # RxNorm codes -> ATC through the RxCUI table
    assert ds.report.orders_dropped_unmapped == 0  # the rest keep their RxNorm code as the drug id
    assert ds.report.patients_kept > 10
    assert any(m.startswith("RXNORM:") for m in ds.med_vocab) == (routes.get("rxnorm-code", 0) > 0)


def _patient(pid: str, admissions: list[tuple[int, list[str], list[MedicationOrder]]]) -> Patient:
    return Patient(
        id=pid,
        source="test",
        admissions=[
            Admission(
                id=f"{pid}-{day}",
                admit_time=dt.datetime(2020, 1, day, tzinfo=dt.UTC),
                diagnoses=[Code(system="ICD9CM", code=c) for c in diags],
                medications=meds,
            )
            for day, diags, meds in admissions
        ],
    )


def test_visits_follow_admission_time_and_unmapped_drugs_are_named(medrec_dir):
    mapper = DrugMapper.from_dir(medrec_dir)
    ndc = next(n for n, rxcui in mapper.ndc_to_rxcui.items() if rxcui in mapper.rxcui_to_atc4)
    known = MedicationOrder(name="Known drug 81 mg tablet", ndc=ndc)
    mystery = MedicationOrder(name="Mystery Drug 5 mg Tablet")
    later_first = _patient("p1", [(9, ["4019"], [known]), (2, ["25000"], [known, mystery])])
    dropped = build_dataset([later_first], MedRecDataConfig(), mapper)
    named = build_dataset([later_first], MedRecDataConfig(unmapped_drugs="rxnorm-or-name"), mapper)
    first_visit_diag = dropped.diag_vocab[dropped.visits[0][0][0][0]]
    assert first_visit_diag == "ICD9CM:25000"  # admitted on day 2, stored second
    assert dropped.report.orders_dropped_unmapped == 1 and dropped.med_vocab == [mapper.atc3(known)[0]]
    assert "NAME:mystery drug" in named.med_vocab and named.report.orders_by_route["name"] == 1


def test_symptoms_from_notes_become_note_codes_without_negated_or_family_mentions():
    from ehrflow.knowledge.graph import KnowledgeGraph

    kg = KnowledgeGraph.default()
    text = "The patient reports chest pain and a cough. She denies fever. Mother had breast cancer."
    visits = []
    for day in (1, 5):
        adm = Admission(
            id=f"a{day}",
            admit_time=dt.datetime(2020, 1, day, tzinfo=dt.UTC),
            diagnoses=[Code(system="ICD9CM", code="4019")],
            medications=[MedicationOrder(name="Aspirin 81 mg tablet")],
            notes=[Note(id=f"n{day}", text=text)],
        )
        visits.append(adm)
    patient = Patient(id="p1", source="test", admissions=visits)
    config = MedRecDataConfig(unmapped_drugs="rxnorm-or-name", symptoms_from_notes=True)
    ds = build_dataset([patient], config, kg=kg)
    added = {ds.code_titles[k].lower() for k in ds.diag_vocab if k.startswith("NOTE:")}
    assert any("chest pain" in t for t in added) and any("cough" in t for t in added)
    assert not any("fever" in t or "breast" in t for t in added)  # negated; about a relative
    assert ds.report.note_mentions == 2 * len(added) and ds.report.note_mentions_skipped >= 4
    plain = build_dataset([patient], MedRecDataConfig(unmapped_drugs="rxnorm-or-name"))
    assert not any(k.startswith("NOTE:") for k in plain.diag_vocab) and plain.report.note_mentions == 0


def test_ndc_normalisation():
    assert ndc11("0006-0749-54") == "00006074954"
    assert ndc11("12345-678-90") == "12345067890"
    assert ndc11("51079025520.0") == "51079025520"
    assert ndc11("0") is None and ndc11("abc") is None and ndc11(None) is None


def test_drug_without_smiles_falls_back_to_text(mimic4_patients, medrec_dir, tmp_path):
    ds = build_dataset(mimic4_patients, _config(medrec_dir, top_med=12))
    smiles = {}
    for line in (medrec_dir / "atc3_smiles.tsv").read_text().splitlines()[1:]:
        atc, smi = line.split("\t")[:2]
        smiles.setdefault(atc, smi)
    with_smiles = [m for m in ds.med_vocab if m in smiles]
    assert len(with_smiles) >= 2
    dropped = with_smiles[0]
    partial = tmp_path / "smiles.tsv"
    partial.write_text("atc3\tsmiles\n" + "".join(f"{m}\t{smiles[m]}\n" for m in with_smiles[1:]))
    reps = build_representations(ds, RepresentationConfig(text_encoder="hashed", use_kg=False, smiles_path=partial))
    i = ds.med_vocab.index(dropped)
    assert dropped in reps.drugs_without_smiles and ds.report.drugs_without_smiles == reps.drugs_without_smiles
    assert not reps.med_has_mol[i] and not reps.med_mol[i].any() and np.linalg.norm(reps.med_text[i]) > 0
    assert reps.med_has_mol[ds.med_vocab.index(with_smiles[1])]
    assert reps.diag_text.shape[0] == len(ds.diag_vocab) and not reps.diag_text[0].any()


def test_bad_ddi_pairs_name_the_line(tmp_path):
    path = tmp_path / "ddi.tsv"
    path.write_text("atc3_a\tatc3_b\nN02B\tB01A\nC07A\n")
    with pytest.raises(RecordError, match="ddi.tsv") as info:
        read_ddi_pairs(path)
    assert info.value.location == "3"


def test_split_is_two_thirds_sixth_sixth():
    train, test, val = split_by_patient(60, seed=0)
    assert (len(train), len(val), len(test)) == (40, 10, 10)
    assert sorted(itertools.chain(train, val, test)) == list(range(60))
    assert split_by_patient(60, seed=0) == (train, test, val)
