"""The findings of a phantom and its clinical indication line.

Findings are sampled with a realistic, imbalanced prevalence (:func:`sample_findings`). The
indication line (:func:`_clinical_text`) is drawn from a small probabilistic model of what a
requesting clinician writes, given the findings that are really there:

- **History** (:data:`_HISTORY`) and **symptoms** (:data:`_SYMPTOMS`) are binary features, each
  drawn by a *noisy-OR*: ``P(feature) = 1 - (1 - leak) * prod(1 - p_f for each finding f present)``.
  ``leak`` is the rate in patients without any linked finding (smokers without nodules, fever
  without pneumonia), so every feature also occurs without its findings.
- **Vital signs and labs** (:data:`_MEASURES`) are numbers drawn from a normal range and shifted
  by the findings (temperature and CRP by consolidation, SpO2 by pneumothorax, effusion and
  consolidation, BNP by cardiomegaly), with wide overlap between the two groups; each is reported
  only sometimes, as a number, as a word ("raised CRP"), or both.
- **Wording**: each feature has several phrasings with abbreviations (SOB, h/o, CHF, Ca, CVL);
  absent symptoms are sometimes written negated ("no fever", "denies cough", "afebrile"); about
  one word in fifty carries a typo; an unrelated reason is often added and sometimes the only one.
- The text never names a finding.

No finding can be read from the text with certainty: every feature has ``p_f < 1`` and ``leak > 0``
and every measure's ranges overlap, so every text has a posterior strictly between 0 and 1 for
every finding. docs/phantoms.md gives the tables and the text-only AUROC a bag-of-words model
reaches on them (also checked in tests/test_phantoms.py).

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


# feature: (leak, {finding: p_f}, phrasings). "{n}" is a number drawn per phrase.
_HISTORY: dict[str, tuple[float, dict[str, float], tuple[str, ...]]] = {
    "smoker": (0.22, {"nodule": 0.40}, (
        "current smoker, {n} pack-years", "ex-smoker ({n} pack-years)", "heavy smoker", "smoker",
        "30/day smoker", "smoking hx {n} pk-yrs")),
    "malignancy": (0.04, {"nodule": 0.25, "effusion": 0.10}, (
        "h/o colorectal Ca, staging", "known melanoma, restaging", "previous breast cancer, follow-up",
        "known renal cell carcinoma", "lung Ca MDT, baseline", "metastatic disease, on chemotherapy",
        "incidental density on abdominal CT, please assess", "weight loss, ?malignancy")),
    "heart_failure": (0.05, {"cardiomegaly": 0.35, "effusion": 0.12}, (
        "known CHF", "congestive heart failure", "ischaemic cardiomyopathy, EF {n}%", "heart failure clinic review",
        "severe mitral regurgitation", "dilated cardiomyopathy", "HFrEF, on furosemide")),
    "procedure": (0.04, {"pneumothorax": 0.35}, (
        "post central venous line insertion, check position", "post CT-guided lung biopsy",
        "post pacemaker insertion", "post CVL", "on mechanical ventilation, desaturation",
        "fall from ladder, rib pain", "stab wound to the chest", "road traffic collision, chest wall tenderness")),
    "copd": (0.10, {"pneumothorax": 0.15, "nodule": 0.08}, (
        "COPD", "known emphysema", "COPD exacerbation", "on home oxygen for COPD")),
    "renal": (0.05, {"effusion": 0.20}, (
        "CKD stage 4, fluid overload", "on haemodialysis", "nephrotic syndrome")),
}
_SYMPTOMS: dict[str, tuple[float, dict[str, float], tuple[str, ...], tuple[str, ...]]] = {
    # feature: (leak, links, phrasings when present, phrasings when absent (negation))
    "fever": (0.08, {"consolidation": 0.45}, (
        "fever", "febrile", "fevers and rigors", "pyrexial", "temp spikes"), ("afebrile", "no fever", "denies fevers")),
    "cough": (0.18, {"consolidation": 0.45, "nodule": 0.15}, (
        "productive cough", "cough for {n} days", "purulent sputum", "persistent cough", "dry cough"),
        ("no cough", "denies cough")),
    "dyspnoea": (0.15, {"effusion": 0.30, "cardiomegaly": 0.25, "pneumothorax": 0.35, "consolidation": 0.20}, (
        "SOB", "shortness of breath", "breathless", "dyspnoea on exertion", "increasing breathlessness",
        "acutely short of breath"), ("no SOB", "not breathless")),
    "pleuritic": (0.05, {"pneumothorax": 0.30, "consolidation": 0.12, "effusion": 0.08}, (
        "pleuritic chest pain", "sharp pain on inspiration", "sudden onset pleuritic pain"), ("no chest pain",)),
    "haemoptysis": (0.02, {"nodule": 0.18}, ("haemoptysis", "blood-streaked sputum"), ("no haemoptysis",)),
    "weight_loss": (0.04, {"nodule": 0.20}, ("weight loss", "unintentional weight loss of {n} kg", "loss of appetite"),
                    ("weight stable",)),
    "oedema": (0.04, {"cardiomegaly": 0.25, "effusion": 0.10}, (
        "bilateral ankle oedema", "orthopnoea", "PND", "leg swelling"), ("no peripheral oedema",)),
    "dull_base": (0.03, {"effusion": 0.30}, (
        "stony dull percussion at the base", "reduced breath sounds at the base", "dull to percussion L base",
        "decreased air entry R base"), ("chest clear", "good air entry bilaterally")),
}
_P_NEGATION = 0.15  # an absent symptom is written negated with this probability
_P_UNRELATED = 0.45
_P_TYPO = 0.02
_UNRELATED = (
    "pre-operative assessment", "routine health screening", "chest pain, ?cause", "follow-up", "fatigue",
    "post-operative day 2 after hip replacement", "asthma, wheeze", "dizziness", "pre-employment screening",
    "palpitations", "abdominal pain", "general malaise", "elevated D-dimer", "hypertension, annual review",
    "no history given", "?cause", "please assess", "fall at home", "collapse",
)


def _measures(rng: np.random.Generator, has: dict[str, bool]) -> list[str]:
    """Vital signs and labs: normal ranges shifted by the findings, each reported only sometimes."""
    out = []
    con, ptx, eff, cm = has["consolidation"], has["pneumothorax"], has["effusion"], has["cardiomegaly"]
    if rng.random() < 0.35:  # temperature, degrees C
        t = rng.normal(37.0, 0.45) + (rng.normal(1.2, 0.6) if con and rng.random() < 0.5 else 0.0)
        out.append(f"T {t:.1f}" if rng.random() < 0.6 else f"temp {t:.1f}C")
    if rng.random() < 0.35:  # oxygen saturation on air, %
        s = rng.normal(97.0, 1.5) - 1.5 * con - 2.0 * ptx - 1.2 * eff - 0.5 * cm
        out.append(f"sats {min(int(round(s)), 100)}% RA" if rng.random() < 0.5 else f"SpO2 {min(int(round(s)), 100)}%")
    if rng.random() < 0.30:  # CRP, mg/L
        c = float(np.exp(rng.normal(1.6, 0.9) + (rng.normal(2.0, 1.0) if con and rng.random() < 0.5 else 0.0)))
        out.append(rng.choice([f"CRP {c:.0f}", "raised CRP" if c > 20 else "CRP normal", f"CRP {c:.0f} (high)" if c > 20 else f"CRP {c:.0f}"]))
    if rng.random() < 0.20:  # white cell count, 10^9/L
        w = rng.normal(7.5, 2.0) + (rng.normal(4.0, 2.5) if con and rng.random() < 0.5 else 0.0)
        out.append(f"WCC {max(w, 1.5):.1f}")
    if rng.random() < (0.25 if cm else 0.12):  # BNP, pg/mL: requested more often when heart failure is suspected
        b = float(np.exp(rng.normal(4.2, 0.9) + (rng.normal(1.8, 0.9) if cm and rng.random() < 0.5 else 0.0)))
        out.append(rng.choice([f"BNP {b:.0f}", "raised BNP" if b > 400 else "BNP normal"]))
    if rng.random() < 0.20:  # heart rate
        h = rng.normal(80, 12) + 6 * con + 8 * ptx
        out.append(f"HR {h:.0f}")
    return out


def _noisy_or(rng: np.random.Generator, leak: float, links: dict[str, float], has: dict[str, bool]) -> bool:
    q = 1.0 - leak
    for f, p in links.items():
        if has.get(f, False):
            q *= 1.0 - p
    return bool(rng.random() < 1.0 - q)


def _typos(rng: np.random.Generator, text: str) -> str:
    """Swap two adjacent letters in about one word in fifty (never in numbers)."""
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3 and w.isalpha() and rng.random() < _P_TYPO:
            j = int(rng.integers(0, len(w) - 1))
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def _clinical_text(rng: np.random.Generator, labels: dict[str, bool], age: int, female: bool) -> str:
    """The indication line: history, symptoms, measures and an unrelated reason, shuffled, with a head."""
    phrases = []
    for leak, links, options in _HISTORY.values():
        if _noisy_or(rng, leak, links, labels):
            phrases.append(str(rng.choice(options)).format(n=rng.integers(10, 60)))
    for leak, links, present, absent in _SYMPTOMS.values():
        if _noisy_or(rng, leak, links, labels):
            phrases.append(str(rng.choice(present)).format(n=rng.integers(2, 14)))
        elif rng.random() < _P_NEGATION:
            phrases.append(str(rng.choice(absent)))
    phrases += _measures(rng, labels)
    if not phrases or rng.random() < _P_UNRELATED:
        phrases.append(str(rng.choice(_UNRELATED)))
    rng.shuffle(phrases)
    sex = "F" if female else "M"
    head = rng.choice([f"{age}{sex}. ", f"{age} y/o {'female' if female else 'male'}. ", f"{sex}, {age}. ", ""])
    text = _typos(rng, head + "; ".join(phrases) + ".")
    return text[0].upper() + text[1:]
