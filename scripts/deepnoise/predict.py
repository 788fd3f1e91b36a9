"""``deepnoise predict``: probabilities per well of the selected model (the teacher with the mean
teacher), averaged over both sites and (with test-time augmentation, the default) 8 dihedral views.

Predicted wells: the treatment wells of ``--experiments`` (of ``--cell-type``) in the site table.
The model and its normalisation mode come from the weights file.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd
import torch

from deepnoise import data, inference, metadata, models
from deepnoise.ensemble import Predictions, save_predictions
from deepnoise.errors import InputError
from deepnoise.runtime import setup_runtime
from deepnoise.weights import load_weights

log = logging.getLogger(__name__)


def load_model(weights: str, cell_type: str, rt) -> tuple[torch.nn.Module, dict, bool, bool]:
    """The selected network of ``weights`` (the teacher with the mean teacher) on ``rt.device``, its
    model config, and the run's ``amp`` / ``channels_last`` runtime knobs."""
    state = load_weights(weights)
    scope = state.get("scope")
    if scope not in (cell_type, "all"):
        raise InputError(f"{weights}: weights fine-tuned for {scope!r}, not for cell type {cell_type}")
    mc = state["model_config"]
    net = models.build_model(mc)
    net.load_state_dict(state["model"])
    net.to(rt.device)
    runtime = {**state.get("hparams", {}), **state.get("runtime", {})}  # older files: all in hparams
    channels_last = bool(runtime.get("channels_last", True))
    if channels_last and rt.cuda:
        net = net.to(memory_format=torch.channels_last)
    return net, mc, bool(runtime.get("amp", True)), channels_last


def predicted_wells(sites: str, cell_type: str, experiments: list[str]) -> pd.DataFrame:
    """The treatment wells of ``experiments`` in the site table; experiments that are missing or of
    another cell type are refused."""
    wells = data.well_table(metadata.read_sites(sites))
    missing = sorted(set(experiments) - set(wells["experiment"]))
    if missing:
        raise InputError(f"{sites}: no experiment(s) {missing}")
    wrong = wells[wells["experiment"].isin(experiments) & (wells["cell_type"] != cell_type)]
    if len(wrong):
        raise InputError(f"experiment {wrong['experiment'].iloc[0]} is not of cell type {cell_type}")
    return wells[
        wells["experiment"].isin(experiments)
        & (wells["cell_type"] == cell_type)
        & (wells["well_type"] == "treatment")
    ].reset_index(drop=True)


def run_predict(
    *,
    weights: str,
    sites: str,
    stacks: list[str],
    stats: list[str],
    cell_type: str,
    experiments: list[str],
    out: str,
    batch_size: int = 32,
    threads: int | None = None,
    device: str = "auto",
    num_workers: int = 2,
    tta: bool = True,
) -> None:
    rt = setup_runtime(device, threads)
    if rt.world > 1 and rt.rank != 0:
        return
    net, mc, amp, channels_last = load_model(weights, cell_type, rt)
    wells = predicted_wells(sites, cell_type, experiments)
    index = data.StackIndex.build(stacks)
    wells = index.locate(wells)
    mean, std = data.normalization_arrays(stats, mc["normalization"], index.keys)
    ds = data.StackDataset(index.files, wells, index=index)
    sampler = data.EpochSampler(len(ds), 0, shuffle=False, random_site=False)
    wells_per_batch = max(1, int(batch_size) // 2)  # both sites of a well go through together
    loader = data.make_loader(ds, sampler, wells_per_batch, num_workers, rt.cuda, drop_last=False)
    probs, order = inference.predict_probs(
        net,
        loader,
        torch.as_tensor(mean, device=rt.device),
        torch.as_tensor(std, device=rt.device),
        rt.device,
        int(mc["input_size"]),
        int(mc["n_treatments"]),
        tta=tta,
        amp=amp,
        channels_last=channels_last,
    )
    if not np.array_equal(order, np.arange(len(wells))):
        raise RuntimeError("prediction order does not match the well table")
    pred = Predictions(
        well_id=wells["well_id"].to_numpy(str),
        experiment=wells["experiment"].to_numpy(str),
        plate=wells["plate"].to_numpy(np.int64),
        well=wells["well"].to_numpy(str),
        dataset=wells["dataset"].to_numpy(str),
        probs=probs.astype(np.float32),
    )
    save_predictions(pred, out)
    log.info("predicted %d wells of %s -> %s", len(wells), cell_type, out)


def _main(args: argparse.Namespace) -> int:
    run_predict(
        weights=args.weights,
        sites=args.sites,
        stacks=args.stacks,
        stats=args.stats,
        cell_type=args.cell_type,
        experiments=args.experiments,
        out=args.out,
        batch_size=args.batch_size,
        threads=args.threads,
        device=args.device,
        num_workers=args.num_workers,
        tta=args.tta,
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="TTA probabilities per well of the selected model", description=__doc__
    )
    p.add_argument("--weights", required=True, help="weights.pt of deepnoise train")
    p.add_argument("--sites", required=True, help="site table CSV")
    p.add_argument("--stacks", nargs="+", required=True, help="HDF5 plate stacks")
    p.add_argument("--stats", nargs="+", required=True, help="statistics JSON files")
    p.add_argument("--cell-type", required=True)
    p.add_argument("--experiments", nargs="+", required=True, help="experiments to predict")
    p.add_argument("--out", required=True, help="output npz")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="sites per forward pass (even: both sites of a well), x8 views with --tta",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num-workers", type=int, default=2, help="loader worker processes")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average the 8 dihedral views of each site (--no-tta: the image as it is, 8x faster)",
    )
    p.set_defaults(func=_main)
