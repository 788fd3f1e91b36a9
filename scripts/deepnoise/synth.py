"""Synthetic RxRx1 screen: cell-like images with class phenotypes and RxRx1's hard structure.

The noise model, with the RxRx1 fact behind each effect, its knobs and what per-plate normalisation
can and cannot undo, is ``docs/noise-model.md``; this module implements it.

The screen mimics RxRx1 scaled down. Treatments ``0..n_treatments-1`` (named ``s{id:05d}``) are split
into 4 fixed groups; every plate of an experiment holds one group (each treatment once), the
plate -> group order being one of the 24 permutations (or, with ``plate_group_orders: cyclic``, one of
the 4 cyclic rotations), chosen per experiment. Every plate also holds the positive controls (ids
``n_treatments..``) and one negative control well (``EMPTY``), all at random inner wells.

Images are 6-channel (one grayscale PNG per channel) renderings of elliptical cells: channel 1 is
the nucleus, channels 2-6 the cytoplasm. A treatment shifts the per-channel intensity and texture,
the cell count, size and elongation; the cell type sets the base appearance and part of the response,
and every experiment scales and perturbs the response (experiment x treatment interaction). Technical
noise: per-experiment/plate gain and offset, stain intensity, channel cross-talk, illumination
fields, focus blur, cell density and size shifts, a non-linear (gamma) response, well-position
gradients and edge effects, well-level shifts and pixel noise.

Every random draw comes from a generator keyed by (seed, what it is for), so the output does not
depend on the thread count or order: the same config gives byte-identical PNGs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from deepnoise import layout
from deepnoise.atomic import atomic_path, temp_dir
from deepnoise.errors import InputError, did_you_mean

log = logging.getLogger(__name__)

# Structural keys: the workflow always passes them.
REQUIRED = (
    "seed",
    "image_size",
    "cell_types",
    "train_experiments_per_cell_type",
    "test_experiments_per_cell_type",
    "n_treatments",
    "n_positive_controls",
    "sites_per_well",
)

# Appearance and noise knobs; a config may omit any of them (docs/noise-model.md: the RxRx1 fact
# behind each). "log-std": std of a normal draw entering as exp(draw).
DEFAULTS = {
    "cells_per_site": 12.0,  # mean number of cells in a site (Poisson)
    "cell_radius": 0.075,  # mean cell radius, as a fraction of the image side
    "nucleus_fraction": 0.5,  # nucleus radius / cell radius
    "phenotype_strength": 0.3,  # std of a treatment's log-effects (intensity, texture, shape, count)
    "control_strength": 2.0,  # positive controls' phenotype is this many times stronger
    "cell_type_specificity": 0.5,  # weight of the cell-type-specific part of a treatment's phenotype
    "cell_type_strength": 0.3,  # std of the per-cell-type log differences of base appearance
    "cell_variability": 0.2,  # std of cell-to-cell log intensity and size variation
    "treatment_interaction": 0.5,  # std of a class's per-experiment phenotype deviation / its strength
    "response_strength": 0.2,  # log-std of the per-experiment scale of all phenotypes
    "experiment_gain": 0.4,  # log-std of the per-experiment, per-channel gain
    "experiment_offset": 12.0,  # std of per-experiment, per-channel additive offset (grey levels)
    "plate_gain": 0.15,  # log-std of the per-plate, per-channel gain
    "plate_offset": 6.0,  # std of per-plate, per-channel additive offset (grey levels)
    "stain_experiment": 0.3,  # log-std of the per-experiment, per-channel stain (cell signal only)
    "stain_plate": 0.1,  # log-std of the per-plate, per-channel stain
    "crosstalk": 0.15,  # scale of the per-experiment channel bleed-through (mixing matrix I + c|z|)
    "illumination_experiment": 0.2,  # log-std of the per-experiment flat field (3x3 control points)
    "illumination_plate": 0.1,  # log-std of the per-plate flat field
    "focus_blur": 0.15,  # median Gaussian blur sigma, as a fraction of the mean cell radius (0: off)
    "focus_plate": 0.5,  # log-std of the per-plate blur sigma
    "focus_site": 0.3,  # log-std of the per-site blur sigma
    "density_experiment": 0.25,  # log-std of the per-experiment cell density
    "density_plate": 0.1,  # log-std of the per-plate cell density
    "density_well": 0.15,  # log-std of the per-well cell density
    "size_experiment": 0.1,  # log-std of the per-experiment cell radius
    "size_plate": 0.05,  # log-std of the per-plate cell radius
    "gamma_experiment": 0.2,  # log-std of the per-experiment, per-channel gamma (non-linear response)
    "gamma_plate": 0.1,  # log-std of the per-plate, per-channel gamma
    "well_gradient": 0.15,  # std of the per-plate relative gain change from plate centre to edge
    "edge_effect": 0.15,  # log-std of the per-plate gain and density change of the border wells
    "well_noise": 0.1,  # log-std of the per-well, per-channel signal shift (shared by its sites)
    "pixel_noise": 5.0,  # std of additive Gaussian pixel noise (grey levels)
    "background": 20.0,  # mean background level before gain/offset (grey levels)
    "brightness": 1.0,  # multiplies the mean cell intensity per channel (BASE_INTENSITY)
    "plate_group_orders": "all",  # plate -> group orders drawn from: all (24 permutations) or cyclic (4)
    # Calibration scales (docs/noise-model.md, "Calibrating the screen"): each multiplies a group of
    # the knobs above; 1.0 = the knobs as given (the hard screen).
    "nuisance_scale": 1.0,  # multiplies every NUISANCE knob (the non-affine technical effects)
    "affine_scale": 1.0,  # multiplies every AFFINE knob (per-experiment / per-plate gain and offset)
}
# The affine technical effects: what per-plate normalisation removes (scaled by affine_scale).
AFFINE = ("experiment_gain", "experiment_offset", "plate_gain", "plate_offset")
# The non-affine technical effects (scaled by nuisance_scale): what no per-channel normalisation
# undoes. Biology (treatment_interaction, response_strength, well_noise) and shot noise
# (pixel_noise) are not in it: they are set on their own.
NUISANCE = (
    "stain_experiment",
    "stain_plate",
    "crosstalk",
    "illumination_experiment",
    "illumination_plate",
    "focus_plate",
    "focus_site",
    "density_experiment",
    "density_plate",
    "density_well",
    "size_experiment",
    "size_plate",
    "gamma_experiment",
    "gamma_plate",
    "well_gradient",
    "edge_effect",
)
SCALES = {"nuisance_scale": NUISANCE, "affine_scale": AFFINE}
# Allowed range of every numeric knob (inclusive); docs/noise-model.md lists the same.
RANGES = {
    "cells_per_site": (0.0, 500.0),  # > 0
    "cell_radius": (0.0, 0.5),  # > 0
    "nucleus_fraction": (0.05, 1.0),
    "phenotype_strength": (0.0, 3.0),
    "control_strength": (0.0, 10.0),
    "cell_type_specificity": (0.0, 5.0),
    "cell_type_strength": (0.0, 3.0),
    "cell_variability": (0.0, 2.0),
    "treatment_interaction": (0.0, 5.0),
    "response_strength": (0.0, 2.0),
    "experiment_gain": (0.0, 2.0),
    "experiment_offset": (0.0, 100.0),
    "plate_gain": (0.0, 2.0),
    "plate_offset": (0.0, 100.0),
    "stain_experiment": (0.0, 2.0),
    "stain_plate": (0.0, 2.0),
    "crosstalk": (0.0, 1.0),
    "illumination_experiment": (0.0, 1.0),
    "illumination_plate": (0.0, 1.0),
    "focus_blur": (0.0, 2.0),
    "focus_plate": (0.0, 2.0),
    "focus_site": (0.0, 2.0),
    "density_experiment": (0.0, 2.0),
    "density_plate": (0.0, 2.0),
    "density_well": (0.0, 2.0),
    "size_experiment": (0.0, 1.0),
    "size_plate": (0.0, 1.0),
    "gamma_experiment": (0.0, 1.0),
    "gamma_plate": (0.0, 1.0),
    "well_gradient": (0.0, 2.0),
    "edge_effect": (0.0, 2.0),
    "well_noise": (0.0, 2.0),
    "pixel_noise": (0.0, 100.0),
    "background": (0.0, 200.0),
    "brightness": (0.0, 4.0),  # > 0
    "nuisance_scale": (0.0, 1.0),
    "affine_scale": (0.0, 1.0),
}
POSITIVE = ("cells_per_site", "cell_radius", "brightness")  # their lower bound is exclusive
GROUP_ORDERS = ("all", "cyclic")
# Integer bounds of the structural keys (image_size: the same as workflow/schemas/config.schema.yaml).
INT_RANGES = {
    "seed": (0, 2**63 - 1),
    "image_size": (16, 1024),
    "train_experiments_per_cell_type": (1, 99),
    "test_experiments_per_cell_type": (0, 99),
    "n_treatments": (4, layout.N_GROUPS * len(layout.INNER_WELLS)),
    "n_positive_controls": (0, len(layout.INNER_WELLS)),
    "sites_per_well": (1, 9),
}

# Mean cell intensity per channel before the cell-type, treatment and technical effects.
BASE_INTENSITY = np.array([110.0, 60.0, 75.0, 50.0, 70.0, 55.0])
# Phenotype vector: 6 channel log-intensities, 6 channel texture log-amplitudes, count, size, shape.
N_PHENO = 15
METADATA_COLUMNS = list(layout.RXRX1_COLUMNS)
TRUTH_COLUMNS = list(layout.TRUTH_COLUMNS)
PNG_COMPRESS_LEVEL = 6


def effective_knobs(cfg: dict) -> dict:
    """The knobs the generator uses: a validated config with each scale applied to its group (a
    scale of 1.0 leaves its knobs exactly as given)."""
    out = dict(cfg)
    for scale, group in SCALES.items():
        for knob in group:
            out[knob] = cfg[knob] * cfg[scale]
    return out


def validate_config(cfg: dict) -> dict:
    """Return the config with defaults filled in; InputError names the first bad key."""
    if not isinstance(cfg, dict):
        raise InputError("synthetic config: expected a JSON object")
    for key in cfg:
        if key not in REQUIRED and key not in DEFAULTS:
            allowed = [*REQUIRED, *DEFAULTS]
            hint = did_you_mean(key, allowed)
            raise InputError(
                f"synthetic config: unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}"
            )
    for key in REQUIRED:
        if key not in cfg:
            raise InputError(f"synthetic config: missing key {key!r}")
    out = {**DEFAULTS, **cfg}

    for key, (lo, hi) in INT_RANGES.items():
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InputError(f"synthetic config: {key!r} must be an integer in {lo}..{hi}, got {value!r}")
    n, p = out["n_treatments"], out["n_positive_controls"]
    if n % layout.N_GROUPS:
        raise InputError(f"synthetic config: 'n_treatments' must be divisible by 4, got {n}")
    if n // layout.N_GROUPS + p + 1 > len(layout.INNER_WELLS):
        raise InputError(
            f"synthetic config: {n // 4} treatments + {p} positive controls + 1 negative control "
            f"do not fit the {len(layout.INNER_WELLS)} inner wells of a plate"
        )
    cell_types = out["cell_types"]
    if not isinstance(cell_types, list) or not cell_types:
        raise InputError("synthetic config: 'cell_types' must be a non-empty list of names")
    for name in cell_types:
        if not isinstance(name, str) or not name or not name.isalnum():
            raise InputError(f"synthetic config: 'cell_types' entry {name!r} must be alphanumeric")
    if len(set(cell_types)) != len(cell_types):
        raise InputError(f"synthetic config: 'cell_types' has duplicates: {cell_types}")
    for key, (lo, hi) in RANGES.items():
        value = out[key]
        number = not isinstance(value, bool) and isinstance(value, int | float)
        if not number or not lo <= value <= hi or (key in POSITIVE and value <= lo):
            low = f"({lo}" if key in POSITIVE else f"[{lo}"
            raise InputError(f"synthetic config: {key!r} must be a number in {low}, {hi}], got {value!r}")
    if out["plate_group_orders"] not in GROUP_ORDERS:
        raise InputError(
            f"synthetic config: 'plate_group_orders' must be one of {', '.join(GROUP_ORDERS)}, "
            f"got {out['plate_group_orders']!r}"
        )
    return out


@functools.lru_cache(maxsize=16)
def _upsampler(coarse: int, size: int) -> np.ndarray:
    """(size, coarse) matrix of linear interpolation weights from a coarse grid to pixel centres."""
    centres = (np.arange(size) + 0.5) * coarse / size - 0.5
    eye = np.eye(coarse, dtype=np.float32)
    return np.stack([np.interp(centres, np.arange(coarse), eye[k]) for k in range(coarse)], 1).astype(
        np.float32
    )


def _rng(seed: int, *key: int | str) -> np.random.Generator:
    """A generator for one purpose: keyed by the seed and a tuple of ints/strings."""
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32]
    for k in key:
        words.append(zlib.crc32(k.encode()) if isinstance(k, str) else int(k))
    return np.random.default_rng(np.random.SeedSequence(words))


@dataclass(frozen=True)
class Well:
    experiment: str
    cell_type: str
    dataset: str
    plate: int
    well: str
    well_type: str
    sirna_id: int
    sirna: str


@functools.lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) Gaussian blur operator (rows sum to 1, so the border keeps its level)."""
    d = np.arange(size, dtype=np.float64)
    g = np.exp(-0.5 * ((d[:, None] - d[None, :]) / sigma) ** 2)
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def _quantised_sigma(sigma: float) -> float:
    """Blur sigmas rounded to 1 % steps so the blur operators can be cached."""
    return float(np.round(np.exp(np.round(np.log(sigma), 2)), 6))


def well_position(well: str) -> tuple[float, float, float]:
    """(row, column) of a well scaled to -1..1 over the used area, and its edge weight exp(-d),
    d being its distance in wells to the border of the used area (1 for a border well)."""
    r, c = layout.ROWS.index(well[0]), layout.COLUMNS.index(int(well[1:]))
    nr, nc = len(layout.ROWS) - 1, len(layout.COLUMNS) - 1
    d = min(r, nr - r, c, nc - c)
    return (r - nr / 2) / (nr / 2), (c - nc / 2) / (nc / 2), float(np.exp(-d))


@dataclass(frozen=True)
class PlateEffects:
    """The technical effects shared by all sites of one plate (experiment and plate parts)."""

    gain: np.ndarray  # (6,) per-channel gain
    offset: np.ndarray  # (6,) per-channel additive offset
    gradient: np.ndarray  # (2, 6) row / column log-gain gradient
    edge_gain: np.ndarray  # (6,) log-gain change of a border well
    edge_density: float  # log cell-density change of a border well
    stain: np.ndarray  # (6,) multiplies the cell signal
    gamma: np.ndarray  # (6,) exponent of the intensity response
    mixing: np.ndarray  # (6, 6) channel cross-talk
    log_density: float  # log cell-density shift
    log_size: float  # log cell-radius shift
    log_focus: float  # log blur-sigma shift
    illumination: np.ndarray  # (6, 3, 3) log flat field at the control points


@dataclass(frozen=True)
class Cells:
    """The elliptical cells of one site (arrays: one entry per cell)."""

    mean_radius: float  # the site's mean cell radius (pixels)
    cy: np.ndarray  # centre row (pixels)
    cx: np.ndarray  # centre column (pixels)
    radii: np.ndarray  # radius (geometric mean of the semi-axes)
    aspect: np.ndarray  # major / minor semi-axis
    angle: np.ndarray  # orientation of the major axis (radians)
    intensity: np.ndarray  # (n, 6) per-channel intensity


def _paint_cells(cells: Cells, size: int, nucleus_fraction: float) -> np.ndarray:
    """The cell signal (6, size, size): nucleus in channel 1, cytoplasm in channels 2-6, each a
    dome over its ellipse."""
    nf = nucleus_fraction
    signal = np.zeros((6, size, size), np.float32)
    for i in range(len(cells.radii)):
        a = cells.radii[i] * np.sqrt(cells.aspect[i])  # semi-axes
        b = cells.radii[i] / np.sqrt(cells.aspect[i])
        half = int(np.ceil(a)) + 1
        y0, y1 = max(0, int(cells.cy[i]) - half), min(size, int(cells.cy[i]) + half + 1)
        x0, x1 = max(0, int(cells.cx[i]) - half), min(size, int(cells.cx[i]) + half + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cells.cy[i]
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cells.cx[i]
        c, s = np.cos(cells.angle[i]), np.sin(cells.angle[i])
        u = (xx * c + yy * s) / a
        v = (yy * c - xx * s) / b
        d2 = u * u + v * v
        cyto = np.sqrt(np.clip(1.0 - d2, 0.0, None))
        nucleus = np.sqrt(np.clip(1.0 - d2 / (nf * nf), 0.0, None))
        signal[0, y0:y1, x0:x1] += cells.intensity[i, 0] * nucleus
        signal[1:, y0:y1, x0:x1] += cells.intensity[i, 1:, None, None] * cyto[None]
    return signal


def _add_texture(
    signal: np.ndarray, amplitude: np.ndarray, radius: float, rng: np.random.Generator
) -> np.ndarray:
    """Texture: smooth multiplicative noise per channel (drawn from ``rng``) at a scale of ~a third
    of a cell, applied to ``signal`` in place."""
    size = signal.shape[-1]
    coarse = max(2, int(round(size / max(1.0, radius / 3))))
    field = rng.standard_normal((6, coarse, coarse)).astype(np.float32)
    up = _upsampler(coarse, size)
    field = np.matmul(np.matmul(up, field), up.T)
    signal *= np.clip(1.0 + amplitude[:, None, None].astype(np.float32) * field, 0.0, None)
    return signal


class Screen:
    """The screen's design and all its random effects, from a validated config."""

    def __init__(self, cfg: dict):
        cfg = effective_knobs(cfg)
        self.cfg = cfg
        self.seed = cfg["seed"]
        self.n = cfg["n_treatments"]
        self.n_pos = cfg["n_positive_controls"]
        self.negative_id = self.n + self.n_pos
        self.experiments = layout.synthetic_experiments(cfg)
        classes = _rng(self.seed, "groups").permutation(self.n)
        self.groups = [np.sort(g) for g in np.split(classes, layout.N_GROUPS)]
        # Phenotypes: a shared part per class plus a cell-type-specific part.
        n_classes = self.negative_id + 1
        shared = _rng(self.seed, "phenotype").standard_normal((n_classes, N_PHENO))
        spec = cfg["cell_type_specificity"]
        strength = np.full((n_classes, 1), cfg["phenotype_strength"])
        strength[self.n : self.negative_id] *= cfg["control_strength"]
        strength[self.negative_id] = 0.0
        self.phenotype = {}
        self.appearance = {}
        for ct in cfg["cell_types"]:
            own = _rng(self.seed, "phenotype", ct).standard_normal((n_classes, N_PHENO))
            self.phenotype[ct] = strength * (shared + spec * own) / np.sqrt(1 + spec**2)
            self.appearance[ct] = cfg["cell_type_strength"] * _rng(
                self.seed, "cell_type", ct
            ).standard_normal(N_PHENO)
        # Experiment x treatment interaction: every experiment scales all phenotypes and perturbs
        # each class's phenotype in its own direction.
        self.response = {}
        for exp in self.experiments:
            rng = _rng(self.seed, "interaction", exp.experiment)
            scale = np.exp(cfg["response_strength"] * rng.standard_normal())
            deviation = cfg["treatment_interaction"] * strength * rng.standard_normal((n_classes, N_PHENO))
            self.response[exp.experiment] = scale * self.phenotype[exp.cell_type] + deviation
        self.plate_effects = {
            (exp.experiment, plate): self._plate_effects(exp.experiment, plate)
            for exp in self.experiments
            for plate in layout.PLATES
        }

    def sirna_name(self, sirna_id: int) -> str:
        return "EMPTY" if sirna_id == self.negative_id else f"s{sirna_id:05d}"

    def plate_groups(self, experiment: str) -> tuple[int, ...]:
        """The group index of each plate of an experiment (plate p holds group ``order[p - 1]``)."""
        g = layout.N_GROUPS
        if self.cfg["plate_group_orders"] == "cyclic":
            rotation = int(_rng(self.seed, "rotation", experiment).integers(g))
            return tuple((p + rotation) % g for p in range(g))
        return tuple(int(k) for k in _rng(self.seed, "plate_groups", experiment).permutation(g))

    def wells(self) -> list[Well]:
        out = []
        for exp in self.experiments:
            order = self.plate_groups(exp.experiment)
            for plate in layout.PLATES:
                group = self.groups[order[plate - 1]]
                rng = _rng(self.seed, "wells", exp.experiment, plate)
                ids = [*rng.permutation(group), *range(self.n, self.negative_id + 1)]
                positions = rng.choice(len(layout.INNER_WELLS), size=len(ids), replace=False)
                for sid, pos in zip(ids, positions, strict=True):
                    sid = int(sid)
                    well_type = (
                        "treatment"
                        if sid < self.n
                        else "negative_control"
                        if sid == self.negative_id
                        else "positive_control"
                    )
                    out.append(
                        Well(
                            exp.experiment,
                            exp.cell_type,
                            exp.dataset,
                            plate,
                            layout.INNER_WELLS[pos],
                            well_type,
                            sid,
                            self.sirna_name(sid),
                        )
                    )
        out.sort(key=lambda w: (w.experiment, w.plate, w.well))
        return out

    def _plate_effects(self, experiment: str, plate: int) -> PlateEffects:
        cfg = self.cfg
        e = _rng(self.seed, "experiment_effect", experiment).standard_normal((2, 6))
        p = _rng(self.seed, "plate_effect", experiment, plate).standard_normal((4, 6))
        gain = np.exp(cfg["experiment_gain"] * e[0] + cfg["plate_gain"] * p[0])
        offset = cfg["experiment_offset"] * e[1] + cfg["plate_offset"] * p[1]
        gradient = cfg["well_gradient"] * p[2:4]
        # The effects added with docs/noise-model.md, each from its own generators.
        ex = _rng(self.seed, "experiment_effect2", experiment)
        pl = _rng(self.seed, "plate_effect2", experiment, plate)
        ex_ch, pl_ch = ex.standard_normal((2, 6)), pl.standard_normal((3, 6))
        ex_s, pl_s = ex.standard_normal(2), pl.standard_normal(4)
        mixing = np.eye(6) + cfg["crosstalk"] * np.abs(ex.standard_normal((6, 6))) * (1 - np.eye(6))
        illumination = cfg["illumination_experiment"] * ex.standard_normal((6, 3, 3))
        illumination = illumination + cfg["illumination_plate"] * pl.standard_normal((6, 3, 3))
        return PlateEffects(
            gain=gain,
            offset=offset,
            gradient=gradient,
            edge_gain=cfg["edge_effect"] * pl_ch[2],
            edge_density=cfg["edge_effect"] * pl_s[3],
            stain=np.exp(cfg["stain_experiment"] * ex_ch[0] + cfg["stain_plate"] * pl_ch[0]),
            gamma=np.exp(cfg["gamma_experiment"] * ex_ch[1] + cfg["gamma_plate"] * pl_ch[1]),
            mixing=mixing,
            log_density=cfg["density_experiment"] * ex_s[0] + cfg["density_plate"] * pl_s[0],
            log_size=cfg["size_experiment"] * ex_s[1] + cfg["size_plate"] * pl_s[1],
            log_focus=cfg["focus_plate"] * pl_s[2],
            illumination=illumination,
        )

    def render(self, w: Well, site: int) -> np.ndarray:
        """One site: uint8 array (6, S, S)."""
        fx = self.plate_effects[(w.experiment, w.plate)]
        rng = _rng(self.seed, "site", w.experiment, w.plate, w.well, site)
        cells, texture_amp = self._site_cells(w, fx, rng)
        signal = _paint_cells(cells, self.cfg["image_size"], self.cfg["nucleus_fraction"])
        signal = _add_texture(signal, texture_amp, cells.mean_radius, rng)
        # Channel cross-talk, then focus blur.
        signal = np.tensordot(fx.mixing.astype(np.float32), signal, axes=1)
        if self.cfg["focus_blur"] > 0:
            signal = self._focus(signal, w, site, fx)
        return self._acquire(signal, w.well, fx, rng)

    def _site_cells(self, w: Well, fx: PlateEffects, rng: np.random.Generator) -> tuple[Cells, np.ndarray]:
        """The cells of one site (class phenotype, cell type, well and plate effects, drawn from
        ``rng``) and the per-channel amplitude of their texture."""
        cfg = self.cfg
        size = cfg["image_size"]
        edge = well_position(w.well)[2]
        wrng = _rng(self.seed, "well_effect", w.experiment, w.plate, w.well)
        well_shift = cfg["well_noise"] * wrng.standard_normal(6)
        well_density = cfg["density_well"] * wrng.standard_normal()
        ph = self.response[w.experiment][w.sirna_id] + self.appearance[w.cell_type]
        intensity = cfg["brightness"] * BASE_INTENSITY * np.exp(ph[0:6] + well_shift) * fx.stain
        texture_amp = 0.35 * np.exp(ph[6:12])
        log_density = ph[12] + fx.log_density + well_density + fx.edge_density * edge
        n_cells = max(1, int(rng.poisson(cfg["cells_per_site"] * np.exp(log_density))))
        radius = cfg["cell_radius"] * size * np.exp(ph[13] + fx.log_size)
        var = cfg["cell_variability"]
        cy, cx = rng.uniform(0, size, (2, n_cells))
        radii = radius * np.exp(var * rng.standard_normal(n_cells))
        aspect = np.exp(np.abs(0.3 + ph[14] + 0.2 * rng.standard_normal(n_cells)))
        angle = rng.uniform(0, np.pi, n_cells)
        cell_int = intensity[None, :] * np.exp(var * rng.standard_normal((n_cells, 1)))
        return Cells(radius, cy, cx, radii, aspect, angle, cell_int), texture_amp

    def _focus(self, signal: np.ndarray, w: Well, site: int, fx: PlateEffects) -> np.ndarray:
        """The signal blurred by the site's focus (plate and site parts of the blur sigma)."""
        cfg = self.cfg
        size = cfg["image_size"]
        log_sigma = (
            fx.log_focus
            + cfg["focus_site"]
            * _rng(self.seed, "focus", w.experiment, w.plate, w.well, site).standard_normal()
        )
        sigma = _quantised_sigma(cfg["focus_blur"] * cfg["cell_radius"] * size * np.exp(log_sigma))
        blur = _blur_matrix(size, sigma)
        return np.matmul(np.matmul(blur, signal), blur.T)

    def _acquire(
        self, signal: np.ndarray, well: str, fx: PlateEffects, rng: np.random.Generator
    ) -> np.ndarray:
        """The camera image of a signal: illumination field x plate gain x well-position gain, the
        non-linear response, the offset and pixel noise (drawn from ``rng``); uint8."""
        cfg = self.cfg
        size = cfg["image_size"]
        row, col, edge = well_position(well)
        flat = np.exp(
            np.matmul(
                np.matmul(_upsampler(3, size), fx.illumination.astype(np.float32)), _upsampler(3, size).T
            )
        )
        gain = fx.gain * np.exp(fx.gradient[0] * row + fx.gradient[1] * col + fx.edge_gain * edge)
        image = (cfg["background"] + signal) * flat * gain[:, None, None].astype(np.float32)
        image = 255.0 * np.power(
            np.clip(image, 0.0, None) / 255.0, fx.gamma[:, None, None].astype(np.float32)
        )
        image += fx.offset[:, None, None].astype(np.float32)
        image += cfg["pixel_noise"] * rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def site_prefix(images: Path, w: Well, site: int) -> Path:
    return images / w.experiment / f"Plate{w.plate}" / f"{w.well}_s{site}"


def write_png(path: Path | str, array: np.ndarray) -> None:
    Image.fromarray(array, mode="L").save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def tables(screen: Screen, wells: list[Well]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """metadata.csv (test treatment labels blanked) and test_truth.csv."""
    rows, truth = [], []
    for w in wells:
        wid = layout.well_id(w.experiment, w.plate, w.well)
        hidden = w.dataset == "test" and w.well_type == "treatment"
        if hidden:
            truth.append((wid, w.experiment, w.plate, w.well, w.cell_type, w.sirna_id))
        for site in range(1, screen.cfg["sites_per_well"] + 1):
            rows.append(
                (
                    f"{wid}_{site}",
                    wid,
                    w.cell_type,
                    w.dataset,
                    w.experiment,
                    w.plate,
                    w.well,
                    site,
                    w.well_type,
                    "" if hidden else w.sirna,
                    -1 if hidden else w.sirna_id,
                )
            )
    return pd.DataFrame(rows, columns=METADATA_COLUMNS), pd.DataFrame(truth, columns=TRUTH_COLUMNS)


def synthesize(cfg: dict, out_images: Path, out_metadata: Path, out_truth: Path, threads: int = 1) -> None:
    cfg = validate_config(cfg)
    screen = Screen(cfg)
    wells = screen.wells()
    out_images = Path(out_images)
    out_images.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_images)
    try:
        for exp in screen.experiments:
            for plate in layout.PLATES:
                (tmp / exp.experiment / f"Plate{plate}").mkdir(parents=True)

        def work(w: Well) -> np.ndarray:
            counts = np.zeros(2, np.int64)
            for site in range(1, cfg["sites_per_well"] + 1):
                image = screen.render(w, site)
                counts += clip_counts(image)
                prefix = site_prefix(tmp, w, site)
                for c in range(layout.N_CHANNELS):
                    write_png(f"{prefix}_w{c + 1}.png", image[c])
            return counts

        with ThreadPoolExecutor(max(1, threads)) as pool:
            clipped = sum(pool.map(work, wells), np.zeros(2, np.int64))
        if out_images.exists():
            shutil.rmtree(out_images)
        os.replace(tmp, out_images)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metadata, truth = tables(screen, wells)
    with atomic_path(out_metadata) as path:
        metadata.to_csv(path, index=False)
    with atomic_path(out_truth) as path:
        truth.to_csv(path, index=False)
    at_0, at_255 = 100 * clipped / (len(metadata) * layout.N_CHANNELS * cfg["image_size"] ** 2)
    log.info(
        "synthesized %d experiments, %d wells, %d sites; clipped pixels: %.3f %% at 0, %.3f %% at 255",
        len(screen.experiments), len(wells), len(metadata), at_0, at_255,
    )  # fmt: skip


def clip_counts(image: np.ndarray) -> np.ndarray:
    """``[pixels at 0, pixels at 255]`` of a uint8 image: what the camera's range clipped (a
    rendered value outside 0..255 ends there; docs/noise-model.md, "Calibrating the screen")."""
    return np.array([np.count_nonzero(image == 0), np.count_nonzero(image == 255)], np.int64)


def clipped_fractions(cfg: dict, max_wells: int | None = None) -> dict[str, float]:
    """Fractions of pixels at 0 and at 255 over the screen's sites (the first ``max_wells`` wells of
    every plate when given: a sample, rendered in memory). ``cfg``: a synthetic config."""
    screen = Screen(validate_config(cfg))
    counts, pixels, seen = np.zeros(2, np.int64), 0, {}
    for w in screen.wells():
        key = (w.experiment, w.plate)
        seen[key] = seen.get(key, 0) + 1
        if max_wells is not None and seen[key] > max_wells:
            continue
        for site in range(1, screen.cfg["sites_per_well"] + 1):
            image = screen.render(w, site)
            counts += clip_counts(image)
            pixels += image.size
    return {"at_0": float(counts[0] / pixels), "at_255": float(counts[1] / pixels)}


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = json.loads(args.config_json)
    except json.JSONDecodeError as exc:
        raise InputError(f"--config-json: not valid JSON: {exc}") from exc
    synthesize(cfg, Path(args.out_images), Path(args.out_metadata), Path(args.out_truth), args.threads)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("synthesize", help="generate a synthetic RxRx1-like screen")
    p.add_argument("--config-json", required=True, help="the synthetic config as a JSON object")
    p.add_argument(
        "--out-images", required=True, help="image root: {experiment}/Plate{p}/{well}_s{s}_w{c}.png"
    )
    p.add_argument("--out-metadata", required=True, help="metadata.csv (rxrx1 columns)")
    p.add_argument("--out-truth", required=True, help="test_truth.csv (labels of the test treatment wells)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_run)
