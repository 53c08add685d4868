"""FHIR R4 bundles (Synthea's export, or any server's ``Bundle``) into ``Patient`` records.

One bundle file is one unit; a directory gives one unit per ``*.json`` file (NDJSON bulk
exports split a patient across per-type files, so they are not read here). The bundle is read
whole: patients stream out one at a time once it is parsed.

Mapping decisions:

- ``Encounter`` -> ``Admission`` (id = the encounter's resource id, ``admission_type`` = the
  class code). ``inpatient`` is True only for the v3 ActCode inpatient classes ``IMP``,
  ``ACUTE`` and ``NONAC``: ``EMER`` visits are emergency-department visits (an admission from
  the ED is a separate ``IMP`` encounter), and ``AMB``/wellness/outpatient/virtual/home visits
  are not hospital stays.
- ``in_hospital_death`` is set only from ``Encounter.hospitalization.dischargeDisposition`` =
  ``exp`` (expired); otherwise ``derive_outcomes`` works it out from ``deceasedDateTime``.
- Times keep their instant and are converted to UTC. A date-only value means midnight UTC of
  that day; partial dates (``YYYY``, ``YYYY-MM``) mean the first day of the period. A dateTime
  with a clock time but no UTC offset is bad input (FHIR requires the offset).
- Conditions prefer an ICD-10-CM coding, then ICD-9-CM, then SNOMED CT; procedures prefer
  ICD-10-PCS, CPT, HCPCS, then SNOMED CT; observations prefer LOINC.
- Condition, Procedure, Observation and MedicationRequest attach to the admission of the
  encounter they reference. The model has no patient-level place for them, so one without an
  encounter is left out with a warning. Notes without an encounter are patient-level notes.
- ``DiagnosticReport.presentedForm`` and ``DocumentReference.content`` text attachments become
  notes. Synthea writes each note twice (a DiagnosticReport and a DocumentReference pointing to
  it); the same text in the same place is kept once, as the DocumentReference.
- An error in a Patient or Encounter resource leaves out (with ``skip_invalid``) every resource
  that hangs on it, reported once.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ehrflow.records.errors import ErrorSink, RecordError
from ehrflow.records.model import Admission, Code, CodeSystem, Measurement, MedicationOrder, Note, Patient

log = logging.getLogger(__name__)

SOURCE = "fhir"

SYSTEM_URLS: dict[str, CodeSystem] = {
    "http://snomed.info/sct": "SNOMEDCT",
    "http://loinc.org": "LOINC",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD9CM",
    "http://www.cms.gov/Medicare/Coding/ICD10": "ICD10PCS",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
    "http://hl7.org/fhir/sid/ndc": "NDC",
    "http://www.whocc.no/atc": "ATC",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": "HCPCS",
}
"""FHIR code system URIs (as registered in the R4 terminology pages) to the model's CodeSystem."""

INPATIENT_CLASSES = frozenset({"IMP", "ACUTE", "NONAC"})
DIAGNOSIS_PREFERENCE: tuple[CodeSystem, ...] = ("ICD10CM", "ICD9CM", "SNOMEDCT")
PROCEDURE_PREFERENCE: tuple[CodeSystem, ...] = ("ICD10PCS", "CPT", "HCPCS", "SNOMEDCT")
OBSERVATION_PREFERENCE: tuple[CodeSystem, ...] = ("LOINC", "SNOMEDCT")
DRUG_PREFERENCE: tuple[CodeSystem, ...] = ("RXNORM", "NDC", "ATC")

_DATE_ONLY = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
_CLINICAL_TYPES = ("Condition", "Procedure", "Observation", "MedicationRequest")
_NOTE_TYPES = ("DocumentReference", "DiagnosticReport")
_HANDLED = ("Patient", "Encounter", *_CLINICAL_TYPES, *_NOTE_TYPES, "Medication")


class _Skip(Exception):
    """A resource left out because the Patient or Encounter it hangs on was already rejected."""


def _system(url: str | None) -> CodeSystem | None:
    return SYSTEM_URLS.get((url or "").rstrip("/"))


def _parse_instant(value: Any, where: str, field: str, source: Path) -> dt.datetime:
    """FHIR date/dateTime/instant -> aware UTC datetime (date-only: midnight UTC)."""
    if not isinstance(value, str):
        raise RecordError(source, where, field, f"expected a FHIR dateTime string, got {type(value).__name__}")
    m = _DATE_ONLY.match(value)
    try:
        if m:
            return dt.datetime(int(m[1]), int(m[2] or 1), int(m[3] or 1), tzinfo=dt.UTC)
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise RecordError(source, where, field, f"not a FHIR dateTime: {value!r}") from None
    if parsed.tzinfo is None:
        raise RecordError(source, where, field, f"dateTime {value!r} has a time but no UTC offset")
    return parsed.astimezone(dt.UTC)


def _parse_date(value: Any, where: str, field: str, source: Path) -> dt.date:
    if not isinstance(value, str) or not (m := _DATE_ONLY.match(value)):
        raise RecordError(source, where, field, f"not a FHIR date: {value!r}")
    try:
        return dt.date(int(m[1]), int(m[2] or 1), int(m[3] or 1))
    except ValueError:
        raise RecordError(source, where, field, f"not a FHIR date: {value!r}") from None


class _Bundle:
    """One parsed bundle: resources indexed by type and by every way they can be referenced."""

    def __init__(self, source: Path, entries: list[Any]):
        self.source = source
        self.by_type: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        self.keys: dict[str, tuple[str, str]] = {}
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        for i, entry in enumerate(entries):
            res = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                raise RecordError(source, f"entry {i}", "resource.resourceType", "entry has no resource with a type")
            rtype = res["resourceType"]
            if rtype not in _HANDLED:
                continue
            full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
            rid = res.get("id") or (full_url.rsplit(":", 1)[-1] if full_url and full_url.startswith("urn:") else None)
            if not isinstance(rid, str) or not rid:
                raise RecordError(source, f"entry {i} ({rtype})", "id", "resource has no id and no urn fullUrl")
            key = (rtype, rid)
            if key in self.resources:
                raise RecordError(source, f"{rtype}/{rid}", "id", "the same resource appears twice in the bundle")
            self.by_type[rtype].append((rid, res))
            self.resources[key] = res
            self.keys[f"{rtype}/{rid}"] = key
            if full_url:
                self.keys[full_url] = key

    def resolve(self, ref: Any, rtype: str) -> tuple[str, str] | None:
        """The (type, id) a reference points to inside this bundle, or None."""
        if not isinstance(ref, dict) or not isinstance(ref.get("reference"), str):
            return None
        text = ref["reference"]
        key = self.keys.get(text)
        if key is None and "/" in text:  # absolute URL or versioned reference: keep Type/id
            parts = text.split("/_history/")[0].rstrip("/").split("/")
            key = self.keys.get("/".join(parts[-2:]))
        return key if key is not None and key[0] == rtype else None


class _PatientBuilder:
    def __init__(self, patient: Patient):
        self.patient = patient
        self.admissions: dict[str, Admission] = {}
        self.note_keys: set[tuple[str | None, str]] = set()


class FhirLoader:
    """Loads FHIR R4 ``Bundle`` JSON files (transaction, batch, collection, searchset)."""

    def units(self, path: Path) -> list[Path]:
        path = Path(path)
        if path.is_dir():
            return sorted(p for p in path.glob("*.json") if p.is_file())
        return [path]

    def load(self, unit: Path, sink: ErrorSink) -> Iterator[Patient]:
        bundle = self._read_bundle(Path(unit), sink)
        if bundle is None:
            return
        yield from _BundleReader(bundle, sink).patients()

    def _read_bundle(self, source: Path, sink: ErrorSink) -> _Bundle | None:
        try:
            with source.open("rb") as fh:
                doc = json.load(fh)
        except json.JSONDecodeError as exc:
            sink.report(RecordError(source, f"line {exc.lineno}, column {exc.colno}", None, f"invalid JSON: {exc.msg}"))
            return None
        except UnicodeDecodeError as exc:
            sink.report(RecordError(source, f"byte {exc.start}", None, f"not UTF-8 JSON: {exc.reason}"))
            return None
        if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
            got = doc.get("resourceType") if isinstance(doc, dict) else type(doc).__name__
            sink.report(RecordError(source, None, "resourceType", f"expected a FHIR Bundle, got {got!r}"))
            return None
        entries = doc.get("entry", [])
        if not isinstance(entries, list):
            sink.report(RecordError(source, f"Bundle/{doc.get('id')}", "entry", "entry must be a list"))
            return None
        try:
            return _Bundle(source, entries)
        except RecordError as err:
            sink.report(err)
            return None


class _BundleReader:
    """Builds the patients of one bundle: Patients, then Encounters, then what hangs on them."""

    def __init__(self, bundle: _Bundle, sink: ErrorSink):
        self.bundle = bundle
        self.source = bundle.source
        self.sink = sink
        self.builders: dict[str, _PatientBuilder] = {}
        self.rejected_patients: set[str] = set()
        self.rejected_encounters: set[str] = set()
        self.unattached = 0

    def patients(self) -> Iterator[Patient]:
        for rtype, handler in (
            ("Patient", self._patient),
            ("Encounter", self._encounter),
            ("Condition", self._condition),
            ("Procedure", self._procedure),
            ("Observation", self._observation),
            ("MedicationRequest", self._medication),
            ("DocumentReference", self._document),
            ("DiagnosticReport", self._report),
        ):
            for rid, res in self.bundle.by_type.get(rtype, []):
                where = f"{rtype}/{rid}"
                try:
                    handler(where, rid, res)
                except _Skip:
                    continue
                except ValidationError as exc:
                    self._reject(rtype, rid, RecordError.from_validation(self.source, where, exc))
                except RecordError as err:
                    self._reject(rtype, rid, err)
        if self.unattached:
            self.sink.warn(
                RecordError(
                    self.source,
                    None,
                    "encounter",
                    f"{self.unattached} clinical resources reference no encounter in this bundle; "
                    "the model has no patient-level place for them, left out",
                )
            )
        for builder in self.builders.values():
            builder.patient.admissions = sorted(
                builder.admissions.values(),
                key=lambda a: (a.admit_time or dt.datetime.max.replace(tzinfo=dt.UTC), a.id),
            )
            yield builder.patient

    def _reject(self, rtype: str, rid: str, err: RecordError) -> None:
        if rtype == "Patient":
            self.rejected_patients.add(rid)
        elif rtype == "Encounter":
            self.rejected_encounters.add(rid)
        self.sink.report(err)

    # -- references -------------------------------------------------------------------------

    def _owner(self, where: str, res: dict[str, Any], field: str = "subject") -> _PatientBuilder:
        if res.get(field) is None:
            raise RecordError(self.source, where, field, "missing (required to place the resource on a patient)")
        key = self.bundle.resolve(res[field], "Patient")
        if key is None:
            raise RecordError(self.source, where, field, f"references no Patient in this bundle ({res[field]!r})")
        if key[1] in self.rejected_patients:
            raise _Skip
        return self.builders[key[1]]

    def _admission(self, where: str, res: dict[str, Any], builder: _PatientBuilder, field: str) -> Admission | None:
        ref = res.get(field)
        if ref is None:
            return None
        key = self.bundle.resolve(ref, "Encounter")
        if key is None:
            raise RecordError(self.source, where, field, f"references no Encounter in this bundle ({ref!r})")
        if key[1] in self.rejected_encounters:
            raise _Skip
        adm = builder.admissions.get(key[1])
        if adm is None:
            raise RecordError(self.source, where, field, "references an Encounter of another patient")
        return adm

    def _clinical_admission(self, where: str, res: dict[str, Any]) -> Admission | None:
        builder = self._owner(where, res)
        adm = self._admission(where, res, builder, "encounter")
        if adm is None:
            self.unattached += 1
        return adm

    def _code(
        self, where: str, field: str, concept: Any, prefer: tuple[CodeSystem, ...]
    ) -> tuple[Code | None, str | None]:
        """The preferred known coding of a CodeableConcept, and its best display text."""
        if not isinstance(concept, dict):
            raise RecordError(self.source, where, field, "missing or not a CodeableConcept")
        codings = concept.get("coding") or []
        if not isinstance(codings, list):
            raise RecordError(self.source, where, f"{field}.coding", "must be a list")
        known: dict[CodeSystem, dict[str, Any]] = {}
        for coding in codings:
            system = _system(coding.get("system")) if isinstance(coding, dict) else None
            if system and coding.get("code") and system not in known:
                known[system] = coding
        display = concept.get("text") or next((c.get("display") for c in codings if isinstance(c, dict)), None)
        if codings and not known:
            systems = sorted({str(c.get("system")) for c in codings if isinstance(c, dict)})
            raise RecordError(self.source, where, f"{field}.coding", f"no coding with a known system (got {systems})")
        if not known:
            return None, display
        system = next((s for s in prefer if s in known), next(iter(known)))
        coding = known[system]
        code = Code(system=system, code=str(coding["code"]), description=coding.get("display") or concept.get("text"))
        return code, display

    def _time(self, where: str, res: dict[str, Any], *fields: str) -> dt.datetime | None:
        """The first of ``fields`` present (``xPeriod`` fields give their start)."""
        for field in fields:
            value = res.get(field)
            if value is None:
                continue
            if field.endswith("Period"):
                if not isinstance(value, dict) or "start" not in value:
                    continue
                return _parse_instant(value["start"], where, f"{field}.start", self.source)
            return _parse_instant(value, where, field, self.source)
        return None

    # -- resources --------------------------------------------------------------------------

    def _patient(self, where: str, rid: str, res: dict[str, Any]) -> None:
        gender = res.get("gender")
        if gender not in (None, "male", "female", "other", "unknown"):
            raise RecordError(self.source, where, "gender", f"not a FHIR gender code: {gender!r}")
        sex = {"male": "M", "female": "F"}.get(gender, "U")
        birth = _parse_date(res["birthDate"], where, "birthDate", self.source) if "birthDate" in res else None
        deceased = None
        if "deceasedDateTime" in res:
            deceased = _parse_instant(res["deceasedDateTime"], where, "deceasedDateTime", self.source)
        patient = Patient(id=f"fhir-{rid}", source=SOURCE, sex=sex, birth_date=birth, deceased_time=deceased)
        self.builders[rid] = _PatientBuilder(patient)

    def _encounter(self, where: str, rid: str, res: dict[str, Any]) -> None:
        builder = self._owner(where, res)
        klass = res.get("class")
        if not isinstance(klass, dict) or not klass.get("code"):
            raise RecordError(self.source, where, "class", "missing encounter class code")
        period = res.get("period") or {}
        admit = _parse_instant(period["start"], where, "period.start", self.source) if "start" in period else None
        discharge = _parse_instant(period["end"], where, "period.end", self.source) if "end" in period else None
        if admit and discharge and discharge < admit:
            raise RecordError(
                self.source, where, "period.end", f"{period['end']} is before period.start {period['start']}"
            )
        adm = Admission(
            id=rid,
            admit_time=admit,
            discharge_time=discharge,
            admission_type=str(klass["code"]),
            inpatient=str(klass["code"]).upper() in INPATIENT_CLASSES,
        )
        disposition = (res.get("hospitalization") or {}).get("dischargeDisposition") or {}
        if any(c.get("code") == "exp" for c in disposition.get("coding", []) if isinstance(c, dict)):
            adm.outcomes.in_hospital_death = True
        builder.admissions[rid] = adm

    def _condition(self, where: str, rid: str, res: dict[str, Any]) -> None:
        adm = self._clinical_admission(where, res)
        code, _ = self._code(where, "code", res.get("code"), DIAGNOSIS_PREFERENCE)
        if code is None:
            raise RecordError(self.source, where, "code.coding", "condition has no coding")
        if adm is not None:
            adm.diagnoses.append(code)

    def _procedure(self, where: str, rid: str, res: dict[str, Any]) -> None:
        adm = self._clinical_admission(where, res)
        code, _ = self._code(where, "code", res.get("code"), PROCEDURE_PREFERENCE)
        if code is None:
            raise RecordError(self.source, where, "code.coding", "procedure has no coding")
        if adm is not None:
            adm.procedures.append(code)

    def _observation(self, where: str, rid: str, res: dict[str, Any]) -> None:
        adm = self._clinical_admission(where, res)
        time = self._time(where, res, "effectiveDateTime", "effectiveInstant", "effectivePeriod", "issued")
        if time is None:
            raise RecordError(self.source, where, "effective[x]", "observation has no effective time or issued")
        measurements = []
        parts = [("", res)] + [(f"component[{i}].", c) for i, c in enumerate(res.get("component") or [])]
        for prefix, part in parts:
            code, display = self._code(where, f"{prefix}code", part.get("code"), OBSERVATION_PREFERENCE)
            value = self._value(where, prefix, part)
            if value is None:  # panels and component-only observations carry no value of their own
                continue
            variable = display or (code.code if code else None)
            if not variable:
                raise RecordError(self.source, where, f"{prefix}code", "observation code has no text, display or code")
            number, text, unit = value
            measurements.append(
                Measurement(time=time, variable=variable, value=number, text_value=text, unit=unit, source_code=code)
            )
        if adm is not None:
            adm.measurements.extend(measurements)

    def _value(
        self, where: str, prefix: str, part: dict[str, Any]
    ) -> tuple[float | None, str | None, str | None] | None:
        if "valueQuantity" in part:
            qty = part["valueQuantity"]
            if (
                not isinstance(qty, dict)
                or not isinstance(qty.get("value"), int | float)
                or isinstance(qty["value"], bool)
            ):
                raise RecordError(self.source, where, f"{prefix}valueQuantity.value", "missing or not a number")
            return float(qty["value"]), None, qty.get("unit") or qty.get("code")
        if "valueCodeableConcept" in part:  # only its text matters, so any code system will do
            concept = part["valueCodeableConcept"]
            codings = (
                [c for c in concept.get("coding") or [] if isinstance(c, dict)] if isinstance(concept, dict) else []
            )
            text = _category(concept) or next((str(c["code"]) for c in codings if c.get("code")), None)
            if not text:
                raise RecordError(self.source, where, f"{prefix}valueCodeableConcept", "has no text, display or code")
            return None, text, None
        if "valueString" in part:
            return (None, str(part["valueString"]), None) if str(part["valueString"]).strip() else None
        for field in ("valueDateTime", "valueTime"):
            if field in part:
                return None, str(part[field]), None
        if "valueBoolean" in part:
            return None, str(bool(part["valueBoolean"])).lower(), None
        if "valueInteger" in part:
            if not isinstance(part["valueInteger"], int):
                raise RecordError(self.source, where, f"{prefix}valueInteger", "not an integer")
            return float(part["valueInteger"]), None, None
        return None

    def _medication(self, where: str, rid: str, res: dict[str, Any]) -> None:
        adm = self._clinical_admission(where, res)
        if "medicationCodeableConcept" in res:
            concept, field = res["medicationCodeableConcept"], "medicationCodeableConcept"
        elif "medicationReference" in res:
            key = self.bundle.resolve(res["medicationReference"], "Medication")
            if key is None:
                raise RecordError(self.source, where, "medicationReference", "references no Medication in this bundle")
            concept, field = self.bundle.resources[key].get("code"), "medicationReference.code"
        else:
            raise RecordError(self.source, where, "medication[x]", "missing")
        code, display = self._code(where, field, concept, DRUG_PREFERENCE)
        name = display or (code.code if code else None)
        if not name:
            raise RecordError(self.source, where, field, "medication has no name or code")
        codes = {}
        if isinstance(concept, dict):
            for coding in concept.get("coding") or []:
                system = _system(coding.get("system")) if isinstance(coding, dict) else None
                if system in DRUG_PREFERENCE and coding.get("code"):
                    codes.setdefault(system.lower(), str(coding["code"]))
        dosage = (res.get("dosageInstruction") or [{}])[0]
        dose_qty = ((dosage.get("doseAndRate") or [{}])[0]).get("doseQuantity") or {}
        route = dosage.get("route") or {}
        order = MedicationOrder(
            name=name,
            rxnorm=codes.get("rxnorm"),
            ndc=codes.get("ndc"),
            atc=codes.get("atc"),
            dose=None if dose_qty.get("value") is None else str(dose_qty["value"]),
            dose_unit=dose_qty.get("unit"),
            route=route.get("text") or next((c.get("display") for c in route.get("coding", [])), None),
            start=self._time(where, res, "authoredOn"),
            stop=self._stop(where, res),
        )
        if adm is not None:
            adm.medications.append(order)

    def _stop(self, where: str, res: dict[str, Any]) -> dt.datetime | None:
        end = ((res.get("dispenseRequest") or {}).get("validityPeriod") or {}).get("end")
        field = "dispenseRequest.validityPeriod.end"
        return None if end is None else _parse_instant(end, where, field, self.source)

    def _document(self, where: str, rid: str, res: dict[str, Any]) -> None:
        context = res.get("context") or {}
        encounters = context.get("encounter") or []
        time = self._time(where, res, "date") or self._time(where, context, "period")
        category = _category(res.get("type")) or _category((res.get("category") or [None])[0])
        attachments = [
            (f"content[{i}].attachment", c.get("attachment")) for i, c in enumerate(res.get("content") or [])
        ]
        refs = {"subject": res.get("subject"), "context.encounter": encounters[0] if encounters else None}
        self._notes(where, rid, refs, "context.encounter", attachments, time, category)

    def _report(self, where: str, rid: str, res: dict[str, Any]) -> None:
        forms = res.get("presentedForm") or []
        if not forms:  # a lab report: its results are Observations already
            return
        time = self._time(where, res, "effectiveDateTime", "effectivePeriod", "issued")
        category = _category(res.get("code")) or _category((res.get("category") or [None])[0])
        attachments = [(f"presentedForm[{i}]", form) for i, form in enumerate(forms)]
        self._notes(where, rid, res, "encounter", attachments, time, category)

    def _notes(
        self,
        where: str,
        rid: str,
        refs: dict[str, Any],
        encounter_field: str,
        attachments: list[tuple[str, Any]],
        time: dt.datetime | None,
        category: str | None,
    ) -> None:
        builder = self._owner(where, refs)
        adm = self._admission(where, refs, builder, encounter_field)
        texts = [self._attachment_text(where, field, attachment) for field, attachment in attachments]
        for i, text in enumerate(texts):
            if text is None:
                continue
            key = (adm.id if adm else None, text)
            if key in builder.note_keys:
                log.debug("%s: same text as a note already read, kept once", where)
                continue
            builder.note_keys.add(key)
            note = Note(id=rid if i == 0 else f"{rid}-{i}", time=time, category=category or "note", text=text)
            (adm.notes if adm else builder.patient.notes).append(note)

    def _attachment_text(self, where: str, field: str, attachment: Any) -> str | None:
        if not isinstance(attachment, dict):
            raise RecordError(self.source, where, field, "missing attachment")
        content_type = str(attachment.get("contentType") or "text/plain")
        if not content_type.startswith("text/") or "data" not in attachment:
            self.sink.warn(
                RecordError(
                    self.source, where, field, f"no inline text ({content_type}); only text attachments are read"
                )
            )
            return None
        charset = re.search(r"charset=([\w-]+)", content_type)
        try:
            return base64.b64decode(attachment["data"], validate=True).decode(charset[1] if charset else "utf-8")
        except (binascii.Error, TypeError, ValueError, LookupError) as exc:
            raise RecordError(self.source, where, f"{field}.data", f"not base64 {content_type} text: {exc}") from None


def _category(concept: Any) -> str | None:
    if not isinstance(concept, dict):
        return None
    codings = concept.get("coding") or []
    return concept.get("text") or next(
        (c.get("display") for c in codings if isinstance(c, dict) and c.get("display")), None
    )


__all__ = ["INPATIENT_CLASSES", "SYSTEM_URLS", "FhirLoader"]
