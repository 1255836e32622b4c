"""The findings of a phantom and its clinical indication line.

Findings are sampled with a realistic, imbalanced prevalence. The indication line is assembled
from clue groups (infection, malignancy, heart failure, pleural, lines and trauma), each linked to
findings through risk factors and never naming one: informative, noisy, sometimes unrelated.

A private module of :mod:`hygeia_lab.phantoms` (``sample_findings`` is re-exported there).
"""
from __future__ import annotations

import numpy as np

# Prevalence of the number of findings per image (0, 1, 2, 3) and the weight of each finding.
_N_FINDINGS_P = np.array([0.50, 0.32, 0.13, 0.05])
_FINDING_W = {"nodule": 0.24, "consolidation": 0.26, "effusion": 0.20, "cardiomegaly": 0.18,
              "pneumothorax": 0.12}


def sample_findings(rng: np.random.Generator) -> list[str]:
    """Findings of one image with a realistic, imbalanced prevalence (about half are normal)."""
    k = int(rng.choice(4, p=_N_FINDINGS_P))
    names = list(_FINDING_W)
    w = np.array([_FINDING_W[n] for n in names])
    chosen = list(rng.choice(names, size=k, replace=False, p=w / w.sum())) if k else []
    if "cardiomegaly" in chosen and "effusion" not in chosen and rng.random() < 0.3:
        chosen.append("effusion")  # heart failure: the two travel together
    return [str(c) for c in chosen]


_CLUES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # clue group: (findings it is linked to, phrases)
    "infection": (("consolidation",), (
        "fever and productive cough for {d} days", "cough, fever, raised CRP", "rigors and purulent sputum",
        "febrile, crackles on auscultation", "suspected chest infection", "cough and fever, not improving on antibiotics",
        "high temperature, right-sided chest pain on breathing", "sepsis, source unknown")),
    "malignancy": (("nodule",), (
        "current smoker, {p} pack-years", "ex-smoker, weight loss", "haemoptysis and weight loss",
        "history of colorectal cancer, staging", "known melanoma, restaging", "previous breast cancer, follow-up",
        "heavy smoker, persistent cough", "incidental density on abdominal CT, please assess")),
    "heart_failure": (("cardiomegaly", "effusion"), (
        "known congestive heart failure, worsening ankle swelling", "breathless on exertion, orthopnoea",
        "ischaemic cardiomyopathy, EF {ef}%", "bilateral leg oedema, raised BNP",
        "dilated cardiomyopathy, increasing breathlessness", "severe mitral regurgitation",
        "paroxysmal nocturnal dyspnoea", "heart failure clinic review")),
    "pleural": (("effusion",), (
        "reduced breath sounds at the base, stony dull percussion", "pleuritic pain, known ovarian cancer",
        "dull to percussion, decreased air entry", "chronic kidney disease, fluid overload")),
    "line_trauma": (("pneumothorax",), (
        "post central venous line insertion, check position", "fall from ladder, rib pain",
        "sudden pleuritic chest pain while at rest, tall and thin", "stab wound to the chest",
        "post CT-guided lung biopsy", "on mechanical ventilation, desaturation", "road traffic collision, chest wall tenderness",
        "post pacemaker insertion")),
}
_UNRELATED = (
    "pre-operative assessment", "routine health screening", "chest pain, ?cause", "shortness of breath",
    "follow-up", "fatigue", "post-operative day 2 after hip replacement", "asthma, wheeze", "dizziness",
    "pre-employment screening", "COPD review", "palpitations", "abdominal pain", "general malaise",
    "elevated D-dimer", "hypertension, annual review", "no history given",
)
_P_CLUE_TRUE, _P_CLUE_FALSE, _P_UNRELATED = 0.55, 0.09, 0.5


def _clinical_text(rng: np.random.Generator, labels: dict[str, bool], age: int, female: bool) -> str:
    """The indication line: a clue per group with its odds, an unrelated reason, an age/sex head."""
    phrases = []
    for linked, options in _CLUES.values():
        p = _P_CLUE_TRUE if any(labels[f] for f in linked) else _P_CLUE_FALSE
        if rng.random() < p:
            phrases.append(str(rng.choice(options)).format(d=rng.integers(2, 10), p=rng.integers(10, 60),
                                                           ef=rng.integers(20, 40)))
    if not phrases or rng.random() < _P_UNRELATED:
        phrases.append(str(rng.choice(_UNRELATED)))
    rng.shuffle(phrases)
    sex = "F" if female else "M"
    head = rng.choice([f"{age}{sex}. ", f"{age} y/o {'female' if female else 'male'}. ", f"{sex}, {age}. ", ""])
    text = head + "; ".join(phrases) + "."
    return text[0].upper() + text[1:]
