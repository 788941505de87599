"""Synthetic clinical notes in the MIMIC-III NOTEEVENTS layout (no real patient data).

Notes are assembled from templates with the categories, section headers, abbreviations,
de-identification brackets and length mix of MIMIC-III, so tokenizers, sentence splitting
and benchmarks see realistic text. Generation is deterministic for a given seed.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

NOTEEVENTS_COLUMNS = (
    "ROW_ID",
    "SUBJECT_ID",
    "HADM_ID",
    "CHARTDATE",
    "CHARTTIME",
    "STORETIME",
    "CATEGORY",
    "DESCRIPTION",
    "CGID",
    "ISERROR",
    "TEXT",
)

# Share of each category in the generated mix (roughly MIMIC-III's proportions, with
# discharge summaries over-represented so that long notes are common enough to matter).
CATEGORY_MIX = {
    "Nursing/other": 0.30,
    "Radiology": 0.25,
    "ECG": 0.15,
    "Physician ": 0.10,
    "Discharge summary": 0.20,
}

_SYMPTOMS = [
    "chest pain",
    "shortness of breath",
    "abdominal pain",
    "fever",
    "syncope",
    "altered mental status",
    "hematemesis",
    "melena",
    "dyspnea on exertion",
    "lower extremity edema",
    "productive cough",
    "nausea and vomiting",
    "headache",
]
_HISTORY = [
    "CAD s/p CABG",
    "CHF with EF 30%",
    "DM2 on insulin",
    "HTN",
    "HLD",
    "COPD on 2L home O2",
    "ESRD on HD",
    "afib on coumadin",
    "h/o DVT",
    "CKD stage III",
    "OSA on CPAP",
    "cirrhosis c/b ascites",
    "h/o CVA with residual L sided weakness",
    "hypothyroidism",
]
_MEDS = [
    ("Aspirin", "81 mg", "PO daily"),
    ("Metoprolol tartrate", "25 mg", "PO b.i.d."),
    ("Lisinopril", "10 mg", "PO q.d."),
    ("Atorvastatin", "80 mg", "PO qhs"),
    ("Furosemide", "40 mg", "PO daily"),
    ("Warfarin", "5 mg", "PO qhs"),
    ("Insulin glargine", "20 units", "SC qhs"),
    ("Pantoprazole", "40 mg", "PO q.d."),
    ("Heparin", "5000 units", "SC t.i.d."),
    ("Vancomycin", "1 g", "IV q12h"),
    ("Piperacillin-tazobactam", "4.5 g", "IV q8h"),
    ("Acetaminophen", "650 mg", "PO q6h prn pain"),
    ("Docusate sodium", "100 mg", "PO b.i.d."),
    ("Levothyroxine", "75 mcg", "PO daily"),
]
_ORGANS = ["lungs", "heart", "liver", "gallbladder", "pancreas", "kidneys", "spleen", "aorta"]
_FINDINGS = [
    "No acute cardiopulmonary process.",
    "There is a small left pleural effusion.",
    "Mild cardiomegaly is unchanged from prior.",
    "No pneumothorax is seen.",
    "Patchy opacity at the right base may represent atelectasis vs. pneumonia.",
    "The ET tube terminates 4 cm above the carina.",
    "No free intraperitoneal air.",
    "Diffuse interstitial markings suggest mild pulmonary edema.",
    "Degenerative changes of the thoracic spine are noted.",
    "The NG tube is seen coursing below the diaphragm with tip in the stomach.",
]
_NURSING = [
    "Pt. resting comfortably in bed, denies pain.",
    "VSS, afebrile overnight.",
    "Lungs with crackles at bases bilaterally, O2 sat 94% on 2L NC.",
    "Foley draining clear yellow urine, UOP 40-60 cc/hr.",
    "Tolerating PO diet, no N/V.",
    "Family in to visit, updated on plan of care by Dr. [**Last Name (STitle) 1234**].",
    "Skin intact, turned and repositioned q2h.",
    "A&Ox3, follows commands, MAE.",
    "BS + x4 quadrants, abd soft, NT/ND.",
    "Received 20 mg IV lasix with good response.",
    "Heparin gtt at 1000 units/hr, PTT due at 0600.",
    "Will continue to monitor closely.",
]
_ECG = [
    "Sinus rhythm. Normal ECG.",
    "Sinus tachycardia. Left axis deviation.",
    "Atrial fibrillation with rapid ventricular response. Nonspecific ST-T wave changes.",
    "Sinus bradycardia. Prolonged QT interval.",
    "Normal sinus rhythm. Q waves in leads III and aVF.",
    "Left bundle branch block. Compared to the previous tracing of [**2101-3-4**] no change.",
]
_TECHNIQUES = ["Single portable AP view of the chest.", "Axial images were obtained following IV contrast."]


@dataclass(frozen=True)
class Note:
    row_id: int
    subject_id: int
    hadm_id: int
    chartdate: str
    category: str
    description: str
    text: str


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2100, 2199)}-{rng.randint(1, 12)}-{rng.randint(1, 28)}"


def _deid_date(rng: random.Random) -> str:
    return f"[**{_date(rng)}**]"


def _sentences(rng: random.Random, pool: list[str], n: int) -> str:
    return " ".join(rng.choice(pool) for _ in range(n))


def _hpi(rng: random.Random, age: int, sex: str) -> str:
    hx = ", ".join(rng.sample(_HISTORY, rng.randint(2, 5)))
    sx = rng.choice(_SYMPTOMS)
    parts = [
        f"Pt. is a {age} y/o {sex} with PMH significant for {hx} who presents with {sx} x {rng.randint(1, 7)} days.",
        f"Pt. was in USOH until {_deid_date(rng)} when he noted worsening {rng.choice(_SYMPTOMS)}.",
        f"In the ED, initial VS were T {rng.uniform(36.5, 39.5):.1f} HR {rng.randint(60, 130)} "
        f"BP {rng.randint(90, 180)}/{rng.randint(50, 100)} RR {rng.randint(12, 30)} O2 sat {rng.randint(85, 100)}% RA.",
        "He was given ASA 325 mg, SL NTG x3 and started on a heparin gtt.",
        f"Labs were notable for a Cr of {rng.uniform(0.7, 4.0):.1f} (baseline 1.1) "
        f"and a trop of {rng.uniform(0.01, 2.5):.2f}.",
        f"CXR showed {rng.choice(_FINDINGS).lower()}",
        f"He was seen by Dr. [**Last Name (STitle) {rng.randint(100, 9999)}**] of cardiology "
        "who recommended admission to the CCU.",
        "On arrival to the floor, pt. reports that his symptoms have improved.",
    ]
    return " ".join(rng.sample(parts, rng.randint(4, len(parts))))


def _med_list(rng: random.Random) -> str:
    meds = rng.sample(_MEDS, rng.randint(4, len(_MEDS)))
    return "\n".join(f"{i}. {name} {dose} {route}" for i, (name, dose, route) in enumerate(meds, 1))


def _hospital_course(rng: random.Random, n_problems: int) -> str:
    out = []
    for i in range(n_problems):
        problem = rng.choice(_SYMPTOMS + _HISTORY)
        body = " ".join(
            [
                f"# {problem.capitalize()}: Pt. was treated with {rng.choice(_MEDS)[0].lower()} "
                "and monitored on telemetry.",
                rng.choice(_NURSING),
                f"Repeat studies on {_deid_date(rng)} showed {rng.choice(_FINDINGS).lower()}",
                f"He will follow up with Dr. [**First Name (STitle) {rng.randint(10, 999)}**] "
                "in [**Hospital1 18**] clinic.",
                rng.choice(_NURSING),
            ]
        )
        out.append(body)
    return "\n\n".join(out)


def discharge_summary(rng: random.Random) -> str:
    age, sex = rng.randint(25, 95), rng.choice(["M", "F"])
    sections = [
        f"Admission Date:  {_deid_date(rng)}              Discharge Date:   {_deid_date(rng)}\n\n"
        f"Date of Birth:  {_deid_date(rng)}             Sex:   {sex}\n\nService: MEDICINE\n",
        "ALLERGIES:\nPatient recorded as having "
        f"{rng.choice(['No Known Allergies', 'Penicillins', 'Sulfa (Sulfonamides)', 'Codeine'])} to Drugs\n",
        f"Attending:[**First Name3 (LF) {rng.randint(100, 9999)}**]\nChief Complaint:\n{rng.choice(_SYMPTOMS)}\n",
        "Major Surgical or Invasive Procedure:\n"
        + rng.choice(["None", "Cardiac catheterization with DES to LAD", "EGD", "Intubation"])
        + "\n",
        "HISTORY OF PRESENT ILLNESS:\n" + _hpi(rng, age, sex) + "\n",
        "PAST MEDICAL HISTORY:\n" + "\n".join(f"- {h}" for h in rng.sample(_HISTORY, rng.randint(3, 8))) + "\n",
        "MEDICATIONS ON ADMISSION:\n" + _med_list(rng) + "\n",
        "PHYSICAL EXAM:\nVS: " + f"T {rng.uniform(36, 39):.1f} BP {rng.randint(90, 180)}/{rng.randint(50, 100)} "
        f"HR {rng.randint(50, 130)} RR {rng.randint(10, 30)} O2 {rng.randint(88, 100)}% 2L NC\n"
        "GEN: NAD, A&Ox3.\nHEENT: PERRL, EOMI, MMM.\nNECK: JVP at 8 cm.\nCV: RRR, nl S1 S2, no m/r/g.\n"
        "LUNGS: CTAB, no wheezes.\nABD: soft, NT/ND, + BS.\nEXT: no c/c/e, 2+ DP pulses.\n",
        "PERTINENT RESULTS:\n"
        + "\n".join(
            f"{_deid_date(rng)} 0{rng.randint(1, 9)}:{rng.randint(10, 59)}AM BLOOD WBC-{rng.uniform(3, 20):.1f} "
            f"RBC-{rng.uniform(2.5, 5.5):.2f} Hgb-{rng.uniform(7, 16):.1f} Hct-{rng.uniform(21, 48):.1f} "
            f"Plt Ct-{rng.randint(50, 450)}"
            for _ in range(rng.randint(2, 8))
        )
        + "\n",
        "BRIEF HOSPITAL COURSE:\n" + _hospital_course(rng, rng.randint(15, 60)) + "\n",
        "DISCHARGE MEDICATIONS:\n" + _med_list(rng) + "\n",
        f"DISCHARGE DISPOSITION:\n{rng.choice(['Home', 'Home With Service', 'Extended Care'])}\n\n"
        f"DISCHARGE DIAGNOSIS:\n{rng.choice(_SYMPTOMS)}\n{rng.choice(_HISTORY)}\n\n"
        "DISCHARGE CONDITION:\nStable, ambulating with assistance.\n",
        "FOLLOWUP INSTRUCTIONS:\nPlease follow up with your PCP Dr. [**Last Name (NamePattern4) "
        f"{rng.randint(100, 9999)}**] within 1-2 weeks. Call [**Telephone/Fax (1) {rng.randint(1000, 9999)}**] "
        "with any questions.\n",
    ]
    return "\n".join(sections)


def radiology(rng: random.Random) -> str:
    study = rng.choice(
        ["CHEST (PORTABLE AP)", "CT ABDOMEN W/CONTRAST", "CT HEAD W/O CONTRAST", "LIVER OR GALLBLADDER US"]
    )
    return (
        f"{_deid_date(rng)} {rng.randint(1, 12)}:{rng.randint(10, 59)} PM\n {study}   "
        f"Clip # [**Clip Number (Radiology) {rng.randint(1000, 99999)}**]\n"
        f" Reason: {rng.choice(_SYMPTOMS)}\n"
        "_____________________________________________________________________________\n"
        f"FINAL REPORT\nINDICATION: {rng.randint(20, 95)}-year-old with {rng.choice(_HISTORY)}, "
        f"now with {rng.choice(_SYMPTOMS)}.\n\n"
        f"COMPARISON: {_deid_date(rng)}.\n\nTECHNIQUE: {rng.choice(_TECHNIQUES)}\n\n"
        f"FINDINGS: {_sentences(rng, _FINDINGS, rng.randint(3, 12))} The {rng.choice(_ORGANS)} is unremarkable.\n\n"
        f"IMPRESSION:\n1. {rng.choice(_FINDINGS)}\n2. {rng.choice(_FINDINGS)}\n"
    )


def nursing(rng: random.Random) -> str:
    headers = ["Neuro:", "CV:", "Resp:", "GI/GU:", "Skin:", "Social:", "Plan:"]
    body = "\n".join(f"{h} {_sentences(rng, _NURSING, rng.randint(1, 4))}" for h in headers)
    return f"NPN 7a-7p\n{body}\n"


def ecg(rng: random.Random) -> str:
    return _sentences(rng, _ECG, rng.randint(1, 2))


def physician(rng: random.Random) -> str:
    age, sex = rng.randint(25, 95), rng.choice(["M", "F"])
    return (
        f"MICU Attending Note\nChief Complaint: {rng.choice(_SYMPTOMS)}\n"
        f"24 Hour Events:\n{_sentences(rng, _NURSING, 3)}\n"
        f"HPI: {_hpi(rng, age, sex)}\nAssessment and Plan:\n{_hospital_course(rng, rng.randint(2, 6))}\n"
    )


_WRITERS = {
    "Discharge summary": (discharge_summary, "Report"),
    "Radiology": (radiology, "CHEST (PORTABLE AP)"),
    "Nursing/other": (nursing, "Report"),
    "ECG": (ecg, "Report"),
    "Physician ": (physician, "Physician Attending Progress Note"),
}


def generate_notes(n: int, seed: int = 0) -> list[Note]:
    """Return `n` synthetic notes with MIMIC-III's category mix, deterministic for `seed`."""
    rng = random.Random(seed)
    categories = list(CATEGORY_MIX)
    weights = [CATEGORY_MIX[c] for c in categories]
    notes = []
    for i in range(n):
        category = rng.choices(categories, weights)[0]
        writer, description = _WRITERS[category]
        notes.append(
            Note(
                row_id=i + 1,
                subject_id=rng.randint(1, 99999),
                hadm_id=rng.randint(100000, 199999),
                chartdate=_date(rng),
                category=category,
                description=description,
                text=writer(rng),
            )
        )
    return notes


# French clinical sentences (accents, elisions, apostrophes) for the French family (DrBERT, DrLongformer).
_FRENCH = [
    "Le patient a été admis à l'hôpital aujourd'hui pour une douleur thoracique.",
    "Il présente une fièvre à 39 °C depuis hier soir.",
    "L'examen clinique retrouve des crépitants aux bases.",
    "Pas d'œdème des membres inférieurs.",
    "La radiographie pulmonaire montre un épanchement pleural gauche.",
    "Traitement : paracétamol 1 g trois fois par jour.",
    "Antécédents : HTA, diabète de type 2, FA sous AVK.",
    "L'évolution est favorable sous antibiothérapie.",
    "Sortie prévue à J5 avec un contrôle chez le médecin traitant.",
    "Mme [**Nom 1234**] est âgée de 78 ans.",
    "Elle n'a pas d'allergie connue.",
    "Électrocardiogramme : rythme sinusal régulier, pas de trouble de la repolarisation.",
]
_FRENCH_HEADERS = ["MOTIF D'HOSPITALISATION :", "HISTOIRE DE LA MALADIE :", "EXAMEN CLINIQUE :", "CONCLUSION :"]


def generate_french_notes(n: int, seed: int = 0) -> list[str]:
    """French note texts built from templated clinical sentences (no real patient data)."""
    rng = random.Random(seed)
    notes = []
    for _ in range(n):
        parts = []
        for header in rng.sample(_FRENCH_HEADERS, rng.randint(1, len(_FRENCH_HEADERS))):
            parts.append(header + "\n" + " ".join(rng.choice(_FRENCH) for _ in range(rng.randint(1, 6))))
        notes.append("\n\n".join(parts))
    return notes


def write_noteevents_csv(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` synthetic notes as a NOTEEVENTS.csv (quoted, multi-line TEXT) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        w.writerow(NOTEEVENTS_COLUMNS)
        for note in generate_notes(n, seed):
            w.writerow(
                [
                    note.row_id,
                    note.subject_id,
                    note.hadm_id,
                    note.chartdate,
                    "",
                    "",
                    note.category,
                    note.description,
                    "",
                    "",
                    note.text,
                ]
            )
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m clinlong.export.synthetic_notes",
        description="Write synthetic MIMIC-III-style notes as NOTEEVENTS.csv.",
    )
    p.add_argument("out", help="CSV path to write")
    p.add_argument("--n", type=int, default=200, help="number of notes (default 200)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_noteevents_csv(args.out, args.n, args.seed)
    print(f"wrote {args.n} synthetic notes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
