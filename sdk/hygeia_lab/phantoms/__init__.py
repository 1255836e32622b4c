"""Synthetic chest-radiograph phantoms: seeded, labelled, with masks, regions and clinical text.

Every model metric in Hygeia is measured on these images, so they aim to be hard enough to mean
something. A phantom is drawn in continuous millimetre coordinates over a ~350 mm field of view
and rendered at any size: 64x64 and 128x128 of one seed show the same patient.

The image model is a projection radiograph in display convention (MONOCHROME2: dense is bright):

- anatomy: soft-tissue torso with shoulders, lung fields (apices, costophrenic angles, diaphragm
  domes, the right one higher), mediastinum with trachea and aortic knob, heart shadow whose
  transverse width is drawn from a cardiothoracic ratio, posterior and anterior ribs, clavicles,
  spine, breast shadows, gastric bubble, a branching pulmonary vessel tree and parenchymal texture;
- variation: patient size, centring, rotation (mediastinum shift) and tilt, inspiration depth
  (dome level, rib spacing, heart shape), exposure (window, gamma, noise), detector blur and
  quantum noise;
- findings (:data:`hygeia.vocab.FINDING_LABELS`): nodule (3-30 mm, small ones faint and often over
  a rib), consolidation (patchy, sometimes fissure-bounded, sometimes with air bronchograms),
  effusion (blunted costophrenic angle up to a meniscus), cardiomegaly (CTR > 0.5; normal hearts
  0.38-0.5), pneumothorax (thin visceral pleural line, no lung markings peripheral to it);
- a clinical indication line whose phrases depend on the findings through risk factors
  (fever and cough, smoking and malignancy, heart failure, lines and trauma) without ever naming
  a finding: informative, noisy, sometimes unrelated.

Thin structures are rendered with analytic anti-aliasing (a line keeps its integrated density
when it is thinner than a pixel), so small findings fade at low resolution the way they do when a
real radiograph is downsampled.

Modules: :mod:`.render` (:func:`make_phantom`), :mod:`.anatomy` (the patient and the normal
layers), :mod:`.findings` (one function per finding), :mod:`.text` (finding prevalence and the
indication line), :mod:`.sets` (splits, sets, .npz files), :mod:`._geometry` (drawing primitives).
Import from this package; the modules are private.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ._geometry import FOV_MM
from .findings import MIMIC_RATES
from .render import DEFAULT_DIFFICULTY, Phantom, make_phantom, phantom_labels_text
from .sets import SPLITS, PhantomSet, class_conditional_set, load_npz, make_phantom_set, save_npz, split_seeds
from .text import sample_findings

__all__ = [
    "DEFAULT_DIFFICULTY", "FOV_MM", "MIMIC_RATES", "SPLITS", "Phantom", "PhantomSet", "make_phantom",
    "make_phantom_set", "class_conditional_set", "split_seeds", "save_npz", "load_npz", "sample_findings",
    "phantom_labels_text", "code_hash",
]


def code_hash() -> str:
    """sha256 (hex) of the phantom code: every module of this package, in name order. A cache key
    for phantom sets written to disk: it changes whenever the code that draws them does."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
