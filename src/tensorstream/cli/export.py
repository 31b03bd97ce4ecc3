"""``tensorstream export``: a checkpoint (or state file) -> ONNX / TorchScript / SavedModel, verified.

Registered in ``tensorstream.cli``; importing this module is cheap (typer
only): the frameworks load when the command runs. See ``docs/export.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tensorstream.cli.common import console, fail, load_spec_or_fail
from tensorstream.cli.common import out as stdout

FormatOpt = Annotated[str, typer.Option(
    "--format", "-f", help="onnx | torchscript | exported-program (torch) | savedmodel (tensorflow).")]


def _learner(spec: Any, state: dict, backend: str) -> Any:
    from tensorstream.backends import make_backend
    from tensorstream.learn import OnlineLearner

    learner = OnlineLearner(spec.model_copy(update={"backend": backend}), make_backend(backend))
    learner.load_state_dict(state)
    return learner


def export(
    spec_path: Annotated[Path, typer.Option("--spec", "-s", metavar="PIPELINE.yaml",
                                            help="The pipeline spec: features, model, checkpoint store.")],
    fmt: FormatOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write (a directory for savedmodel); "
                                      "the feature layout goes beside it as <OUT>.layout.json.")],
    version: Annotated[str | None, typer.Argument(
        metavar="[VERSION]",
        help="A checkpoint id of the pipeline's store (`tensorstream models checkpoints`).")] = None,
    state: Annotated[str | None, typer.Option(
        "--state",
        help="A safetensors state file (`run --save-state`, any fsspec URL) instead of a checkpoint.")] = None,
    backend: Annotated[str | None, typer.Option(
        help="Rebuild on this framework (default: the one that trained it); built-in linear/mlp models "
             "cross over, so a torch-trained model can become a SavedModel.")] = None,
    state_dir: Annotated[str | None, typer.Option(help="Override the spec's state_dir.")] = None,
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset.")] = 18,
    atol: Annotated[float, typer.Option(help="Largest |exported - live| accepted by the verification.")] = 1e-5,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
) -> None:
    """Export a trained model as one inference graph (standardisation + model + softmax) and verify it.

    The artefact is then loaded back with its own runtime and compared
    with the live model on seeded random rows: over --atol, it is deleted
    and the command fails. Categorical encoding stays outside the graph:
    <OUT>.layout.json says how to build the input row (docs/export.md).
    """
    from tensorstream.export import FORMATS, ExportError, export_learner

    if (version is None) == (state is None):
        fail("give a checkpoint VERSION or --state FILE (one of them)", code=2)
    if backend is not None and backend not in FORMATS:
        fail(f"--backend {backend!r}: choose {' or '.join(FORMATS)}", code=2)
    spec = load_spec_or_fail(spec_path, state_dir)

    from tensorstream.checkpoint import CheckpointError, CheckpointStore, StateFileError, load_state

    try:
        if state is not None:
            arrays, meta = load_state(state)
            trained_on = meta.get("backend") or spec.backend
            spec_hash = meta.get("spec_hash")
            info = {"state": state, **{k: meta[k] for k in ("version", "n_learned") if k in meta}}
        else:
            arrays, ckpt = CheckpointStore(spec.checkpoint_url, keep_last=None).load(version)
            trained_on, spec_hash = ckpt.backend, ckpt.spec_hash
            info = {"checkpoint": ckpt.id, "n_learned": ckpt.n_learned, "promoted": ckpt.promoted,
                    "created": ckpt.created_at.isoformat(timespec="seconds")}
    except (CheckpointError, StateFileError) as e:
        fail(str(e))
    mine = spec.model_copy(update={"backend": trained_on}).spec_hash()
    if spec_hash and spec_hash != mine:
        fail(f"{version or state} was written for another model/feature spec (hash {spec_hash}, "
              f"{spec_path} gives {mine})")
    target = backend or trained_on
    info.update(pipeline=spec.name, trained_on=trained_on, spec_hash=mine)

    with console.status(f"exporting {version or state} ({target}) as {fmt} ..."):
        try:
            learner = _learner(spec, arrays, target)
            result = export_learner(learner, fmt, out, opset=opset, atol=atol, overwrite=force, model_info=info)
        except (ExportError, ValueError, TypeError, ImportError) as e:
            fail(str(e))
    stdout.print(f"exported {result.format} ({result.backend}): {result.path}  layout: {result.layout_path}",
                 highlight=False)
    stdout.print(f"verified: max |exported - live| = {result.max_abs_diff:.3g} (atol {atol:g}) on "
                 f"{' and '.join(map(str, result.rows))} seeded random rows", highlight=False)
