"""Derived outcome labels, computed the same way for every source.

- **In-hospital death**: the source's own flag where it has one (MIMIC ``hospital_expire_flag``,
  PhysioNet ``In-hospital_death``); otherwise a recorded death time between admission and
  discharge (inclusive).
- **30-day readmission**: the patient has another admission whose admit time falls within 30
  days after this admission's discharge. Admissions ending in death are excluded (label ``None``),
  as are admissions without a discharge time.
- Only inpatient admissions (``Admission.inpatient``) are labelled or count as readmissions.
- **Length of stay**: (discharge - admit) in days.
"""

from __future__ import annotations

import datetime as dt

from ehrflow.records.model import Admission, Patient

READMISSION_WINDOW = dt.timedelta(days=30)


def died_during(adm: Admission, deceased_time: dt.datetime | None) -> bool | None:
    if deceased_time is None:
        return False if adm.discharge_time else None
    if adm.admit_time is None or adm.discharge_time is None:
        return None
    if deceased_time.time() == dt.time(0) and deceased_time.tzinfo == dt.UTC:
        # A date-only death (Synthea, FHIR deceasedDate): compare calendar days.
        return adm.admit_time.date() <= deceased_time.date() <= adm.discharge_time.date() + dt.timedelta(days=1)
    return adm.admit_time <= deceased_time <= adm.discharge_time + dt.timedelta(days=1)


def derive_outcomes(patient: Patient) -> Patient:
    """Fill the derived fields of every admission's ``Outcomes`` in place and return the patient."""
    adms = sorted(
        (a for a in patient.admissions if a.time_basis == "absolute" and a.inpatient),
        key=lambda a: a.admit_time or dt.datetime.max.replace(tzinfo=dt.UTC),
    )
    for i, adm in enumerate(adms):
        out = adm.outcomes
        if out.in_hospital_death is None:
            out.in_hospital_death = died_during(adm, patient.deceased_time)
        if out.length_of_stay_days is None and adm.admit_time and adm.discharge_time:
            out.length_of_stay_days = (adm.discharge_time - adm.admit_time).total_seconds() / 86400
        if out.in_hospital_death or adm.discharge_time is None:
            out.readmission_30d = None
            continue
        out.readmission_30d = any(
            later.admit_time is not None
            and adm.discharge_time <= later.admit_time <= adm.discharge_time + READMISSION_WINDOW
            for later in adms[i + 1 :]
        )
    return patient
