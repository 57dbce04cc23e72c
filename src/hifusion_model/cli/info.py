"""``hifusion info [MODEL]``: what a model predicts, what it was trained on, and how well it did.

Loading the model fully (not just reading the card) also proves that the weights fit the
network the configuration describes, so ``info`` doubles as a checkpoint check.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..data.expression import NORMALIZATIONS
from ..engine.card import ModelCard
from ..errors import CheckpointError, ConfigError
from ..evaluation.metrics import MARKER_GENES, top_genes
from ..models.checkpoint import FORMAT, Checkpoint, load_model
from ..models.config import ENCODERS
from ..models.hifusion import count_parameters


def add_parser(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description="Show the model card of a napari-hifusion checkpoint.",
    )
    p.add_argument("model", nargs="?", default="bundled", metavar="MODEL",
                   help="checkpoint file, or 'bundled' for the model shipped with the package "
                        "(default)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the card and config as JSON")
    out.add_argument("--genes", action="store_true",
                     help="list every gene, with its validation PCC when the card has it")
    return p


def run(args: argparse.Namespace) -> int:
    model, ckpt = load_model(args.model)
    n_params = count_parameters(model)
    if args.json:
        print(json.dumps(describe(ckpt, n_params), indent=2))
    elif args.genes:
        print(gene_table(ckpt))
    else:
        print(format_card(ckpt, n_params))
    return 0


def describe(ckpt: Checkpoint, n_parameters: int) -> dict[str, Any]:
    """Everything ``info`` knows, as one JSON-ready dict."""
    return {
        "file": str(ckpt.path),
        "format": FORMAT,
        "stored_dtype": ckpt.stored_dtype,
        "n_parameters": n_parameters,
        "config": ckpt.config.to_dict(),
        "card": ckpt.card,
    }


def _validation(ckpt: Checkpoint) -> dict[str, Any]:
    v = ckpt.card.get("validation")
    return v if isinstance(v, dict) else {}


def gene_table(ckpt: Checkpoint) -> str:
    """One gene per line, tab-separated from its validation PCC when known."""
    pccs = _validation(ckpt).get("gene_pcc_all") or {}
    return "\n".join(
        f"{g}\t{pccs[g]:.4f}" if isinstance(pccs.get(g), (int, float)) else g
        for g in ckpt.genes
    )


def _as_text(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "not recorded"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def _test(ckpt: Checkpoint) -> tuple[str, dict[str, Any]]:
    """Metrics on a held-out section, when the card records them (the bundled model does)."""
    t = ckpt.card.get("test")
    if not isinstance(t, dict) or not isinstance(t.get("metrics"), dict):
        return "", {}
    return f"Test ({t.get('section', '?')}, never seen)", t["metrics"]


def _validation_lines(v: dict[str, Any], title: str = "Validation",
                      missing: str | None = None) -> list[tuple[str, str]]:
    """``missing`` says why there are no metrics (e.g. the card's "none: every spot trains")."""
    if not v:
        return [(title, missing or "not recorded")]
    base = v.get("baseline") or {}
    scope = f"{v.get('n_spots', '?')} spots, {v.get('n_sections', '?')} section(s)"
    lines = [
        (title, f"{scope}; constant-mean baseline in brackets"),
        ("  gene PCC", f"{_num(v.get('gene_pcc'))} [{_num(base.get('gene_pcc'))}]"
                       "  (per gene across spots, the field's metric)"),
        ("  spot PCC", f"{_num(v.get('spot_pcc'))} [{_num(base.get('spot_pcc'))}]"
                       "  (per spot across genes, the paper's metric)"),
        ("  MSE", f"{_num(v.get('mse'))} [{_num(base.get('mse'))}]   skill {_num(v.get('skill'))}"),
    ]
    markers = v.get("genes") or {}
    if markers:
        lines.append(("  markers", "  ".join(f"{g} {_num(r)}" for g, r in markers.items())))
    pccs = v.get("gene_pcc_all") or {}
    if pccs:
        best = top_genes({g: r for g, r in pccs.items() if isinstance(r, (int, float))}, 5)
        lines.append(("  top genes", "  ".join(f"{g} {_num(r)}" for g, r in best)))
    return lines


def _unvalidated(card: dict[str, Any]) -> str | None:
    """Why a run has no validation metrics, when it held no spot out on purpose."""
    try:
        split = ModelCard.from_dict(card).split
    except (CheckpointError, ConfigError):  # not a card hifusion train wrote
        return None
    return split.describe() if split.kind == "none" else None


def _refit_lines(refit: dict[str, Any] | None, command: str | None) -> list[tuple[str, str]]:
    if not refit:
        return []
    lines = [("Refit", f"retrained on every spot to epoch {refit.get('epoch', '?')}, the epoch a "
                       f"selection run chose on {refit.get('selection_validation_split', '?')}")]
    selection = refit.get("selection_command")
    if selection and selection != command:  # e.g. a refit resumed with its own command
        lines.append(("Selection run", selection))
    return lines


def _encoder_lines(card: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"{encoder.capitalize()} encoder", f"started from the weights in {path}")
            for encoder in ENCODERS if (path := card.get(f"{encoder}_encoder_init"))]


def _pseudo_lines(sections: list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    return [("Pseudo-labels", f"{s.get('n_train', '?')} spots of {s.get('name', '?')}, labelled by "
                              + ", ".join(map(str, s["pseudo_labels_from"])))
            for s in sections or [] if isinstance(s, dict) and s.get("pseudo_labels_from")]


def format_card(ckpt: Checkpoint, n_parameters: int) -> str:
    """The human-readable card: one labelled line per fact."""
    c, card = ckpt.config, ckpt.card
    size_mb = ckpt.path.stat().st_size / 1e6
    shown = ", ".join(c.genes[:6]) + (", ..." if c.n_genes > 6 else "")
    markers = ", ".join(f"{g} {'yes' if g in c.genes else 'no'}" for g in MARKER_GENES)
    norm = f"{c.normalization}: {NORMALIZATIONS.get(c.normalization, '')}"
    if card.get("normalization") not in (None, c.normalization):
        norm += f" ({card['normalization']})"
    lines = [
        ("File", f"{ckpt.path} ({size_mb:.1f} MB, {ckpt.stored_dtype} weights)"),
        ("Format", FORMAT),
        ("Genes", f"{c.n_genes}: {shown}"),
        ("Markers", markers),
        ("Targets", norm),
        ("Patches", f"spot {c.spot_px} px = {c.spot_um:.1f} µm, region {c.region_px} px = "
                    f"{c.region_um:.1f} µm ({c.mpp:.4g} µm/px)"),
        ("Network", f"{n_parameters:,} parameters; levels {'/'.join(map(str, c.levels))}, "
                    f"width {c.width}, {c.heads} heads"),
        ("Trained on", _as_text(card.get("data"))),
        *_encoder_lines(card),
        *_pseudo_lines(card.get("sections")),
        ("Command", _as_text(card.get("command"))),
        ("Date", _as_text(card.get("date"))),
        *_refit_lines(card.get("refit"), card.get("command")),
        *_validation_lines(_validation(ckpt), "Validation (of the selection run)"
                           if card.get("refit") else "Validation", _unvalidated(card)),
    ]
    title, test = _test(ckpt)
    if test:
        lines += _validation_lines(test, title)
    noise = card.get("noise_model")
    lines.append(("Uncertainty", (
        f"counting noise at a library read from the {', '.join(noise['features'])} (fitted on "
        f"{noise['n_spots']} training spots, residual SD {noise['residual_sd']:.2f} ln units)"
        if noise else "none (trained before the per-spot uncertainty existed)")))
    if card.get("notes"):
        lines.append(("Notes", _as_text(card["notes"])))
    width = max(len(label) for label, _ in lines) + 2
    return "\n".join(f"{label:<{width}}{text}" for label, text in lines)
