"""``python -m model {export,compile,import,predict,info,train,eval,sheet}``: the model package from the shell."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from .artifact import FORMATS, TORCHSCRIPT, ModelLoadError
from .autoprecision import compile_and_choose
from .compiled import compile_package, is_package, read_meta, read_package
from .data import FolderDataset, SyntheticShapes, synthetic_sample
from .devices import DEVICE_HELP, resolve_device
from .export import build_network, export_torchscript, read_artifact
from .imported import IMAGENET_MEAN, IMAGENET_STD, ModelImportError, exportable, import_torchscript
from .keras_import import KERAS_MEAN, KERAS_STD, import_keras, is_keras_file
from .loading import load
from .network import ModelConfig
from .parity import summary as parity_summary
from .precision import PRECISIONS
from .predictor import Segmenter
from .pretrained import compile_default, default_artifact_path, default_package_path, precision_record_path
from .scores import confusion_matrix, scores
from .train import TrainOptions, train
from .visualize import mask_to_image, overlay


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="TorchScript artifact or compiled package (default: the bundled model)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--precision", default="fp32", choices=[*PRECISIONS, "auto"])
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS])


def _load(args):
    return load(args.model, device=args.device, precision=args.precision, format=args.format)


def cmd_compile(args) -> int:
    """torch.export + AOTInductor: the bundled model into the cache, or an artifact to --out."""
    dev = resolve_device(args.device)
    if args.model is None:
        done = (
            precision_record_path(dev)
            if args.precision == "auto"
            else default_package_path(dev, args.precision)
        )
        if args.if_missing and done.is_file():
            print(f"{done} exists: nothing to compile")
            return 0
        record = compile_default(dev, args.precision, data=args.data, count=args.count)
        print(json.dumps(record, indent=2))
        return 0
    if not args.out:
        raise ValueError("--out is needed with --model (the bundled model goes into the cache)")
    artifact = read_artifact(args.model)
    if artifact.config.network == "imported":
        return _compile_imported(artifact, dev, args)
    net = build_network(artifact.config, artifact.module.state_dict())
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent or ".") as tmp:
        results, chosen = compile_and_choose(
            net, artifact.config, dev, args.precision, lambda p: Path(tmp) / f"{p}.pt2",
            version=artifact.version, extra_meta={"name": artifact.name}, data=args.data, count=args.count,
        )  # fmt: skip
        (Path(tmp) / f"{chosen}.pt2").replace(args.out)  # each was written whole: moved into place
    print(json.dumps({"out": args.out, "results": results, "chosen": chosen}, indent=2))
    return 0


def _compile_imported(artifact, dev, args) -> int:
    """An imported model into a package: fp32 (its weights are constants of the converted
    graph), checked against the TorchScript artifact on synthetic images before it is kept."""
    if args.precision not in ("auto", "fp32"):
        raise ModelImportError(f"an imported model compiles in fp32 only, not {args.precision}")
    reference = load(args.model, device=dev, format=TORCHSCRIPT)
    path = compile_package(
        exportable(artifact.module, artifact.config), args.out, artifact.config, dev, "fp32",
        version=artifact.version,
        extra_meta={"name": artifact.name, "imported_from": artifact.meta.get("imported_from")},
    )  # fmt: skip
    package = read_package(path, dev)
    compiled = Segmenter(package.module, package, dev, "fp32", bool(package.meta.get("channels_last")))
    h, w = artifact.config.input_size
    images = [synthetic_sample(2, i, (h, w)).image for i in range(8)]
    agreement = float(np.mean([(compiled.predict(im) == reference.predict(im)).mean() for im in images]))
    if agreement < 0.999:
        Path(path).unlink(missing_ok=True)
        raise ModelImportError(
            f"the compiled package agrees with the TorchScript model on {agreement:.4f} of pixels only"
        )
    print(
        json.dumps({"out": str(path), "precision": "fp32", "agreement_with_torchscript": agreement}, indent=2)
    )
    return 0


def cmd_export(args) -> int:
    config = ModelConfig.from_json(Path(args.config).read_text())
    net = build_network(config, load_file(args.weights))
    path = export_torchscript(net, args.out, config, version=args.version)
    print(path)
    return 0


def cmd_info(args) -> int:
    path = Path(args.model) if args.model else default_artifact_path()
    if is_package(path):  # its metadata counts its parameters; its code is not loaded
        config, meta = read_meta(path)
        print(json.dumps({"path": str(path), **meta, "config": config.to_dict()}, indent=2))
        return 0
    artifact = read_artifact(path)
    params = sum(p.numel() for p in artifact.module.parameters())
    info = {"path": str(path), **artifact.meta, "parameters": params, "config": artifact.config.to_dict()}
    print(json.dumps(info, indent=2))
    return 0


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def image_paths(given: List[str]) -> List[Path]:
    """Files as given, and the images in each folder given (sorted, not recursive)."""
    paths: List[Path] = []
    for name in given:
        p = Path(name)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"{name}: no such file or folder")
    if not paths:
        raise FileNotFoundError(f"no images in {', '.join(given)} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def _progress(done: int, total: int) -> None:
    """A progress bar on stderr (on a terminal: redrawn in place)."""
    width = 30
    filled = width * done // total
    end = "\n" if done == total or not sys.stderr.isatty() else ""
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def cmd_predict(args) -> int:
    """Masks and overlays for files or folders of images, a batch at a time (only one
    batch of decoded images is in memory at once, however many there are)."""
    seg = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = image_paths(args.images)
    n = seg.config.num_classes
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        images = [ImageOps.exif_transpose(Image.open(p)) for p in chunk]
        for path, image, mask in zip(chunk, images, seg.predict(images, batch_size=args.batch_size)):
            mask_to_image(mask, n).save(out / f"{path.stem}.mask.png")
            overlay(image, mask, n).save(out / f"{path.stem}.overlay.png")
            fractions = np.bincount(mask.ravel(), minlength=n) / mask.size
            summary = ", ".join(f"{c} {f:.3f}" for c, f in zip(seg.class_names, fractions))
            print(f"{path}: {out / (path.stem + '.mask.png')} ({summary})")
        if len(paths) > 1:
            _progress(min(start + args.batch_size, len(paths)), len(paths))
    return 0


def cmd_train(args) -> int:
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    opts = TrainOptions(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    config = ModelConfig.from_json(Path(args.config).read_text()) if args.config else None
    summary = train(opts, config)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args) -> int:
    seg = _load(args)
    cfg = seg.config
    if args.data == "synthetic":
        dataset = SyntheticShapes(args.count, seed=args.seed, size=tuple(cfg.input_size))
    else:
        dataset = FolderDataset(args.data, cfg.num_classes)
    started = time.perf_counter()
    confusion = torch.zeros(cfg.num_classes, cfg.num_classes, dtype=torch.int64)
    for start in range(0, len(dataset), args.batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + args.batch_size))]
        masks = seg.predict([image for image, _ in items], batch_size=args.batch_size)
        for pred, (_, target) in zip(masks, items):
            confusion += confusion_matrix(torch.from_numpy(pred), target, cfg.num_classes)
    result = scores(confusion, cfg.class_names)
    result.update(images=len(dataset), seconds=round(time.perf_counter() - started, 2), data=args.data)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, iou in result["iou"].items():
            print(f"IoU {name:<12} {'-' if iou is None else f'{iou:.4f}'}")
        print(f"mIoU           {result['miou']:.4f}")
        print(f"pixel accuracy {result['pixel_accuracy']:.4f}")
        print(f"({result['images']} images, {result['seconds']} s)")
    return 0


def cmd_sheet(args) -> int:
    """A contact sheet: synthetic images, their predicted overlays, the true masks."""
    seg = _load(args)
    n = seg.config.num_classes
    samples = [synthetic_sample(args.seed, i, tuple(seg.config.input_size)) for i in range(args.count)]
    masks = seg.predict([s.image for s in samples])
    rows = []
    for sample, mask in zip(samples, masks):
        tiles = [
            Image.fromarray(sample.image),
            overlay(sample.image, mask, n),
            mask_to_image(mask, n).convert("RGB"),
            mask_to_image(sample.mask, n).convert("RGB"),
        ]
        rows.append(np.concatenate([np.asarray(t) for t in tiles], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)
    print(f"{args.out}: columns = image, overlay, predicted mask, true mask")
    return 0


def cmd_import(args) -> int:
    """Someone else's TorchScript or Keras segmentation model -> a chanseg artifact."""
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    keras = is_keras_file(args.file)
    mean = args.mean or list(KERAS_MEAN if keras else IMAGENET_MEAN)
    std = args.std or list(KERAS_STD if keras else IMAGENET_STD)
    if not keras:
        given = {option: getattr(args, dest) for option, dest in _KERAS_OPTIONS.items()}
        unused = [option for option, value in given.items() if value is not None and value is not False]
        if unused:
            raise ModelImportError(f"{', '.join(unused)}: for Keras files only (.keras, .h5, .weights.h5)")
        if args.input_size is None:
            raise ModelImportError("--input-size H W is needed for a TorchScript model")
        path = import_torchscript(
            args.file, args.out, classes, args.input_size, mean=mean, std=std, name=args.name,
            version=args.version, output_key=args.output_key,
        )  # fmt: skip
        print(f"{path}: {len(classes)} classes, input {args.input_size[0]}x{args.input_size[1]}")
        return 0
    if args.output_key is not None:
        raise ModelImportError("--output-key is for TorchScript models: a Keras model has one output")
    path = import_keras(
        args.file, args.out, classes, args.input_size, mean=mean, std=std, name=args.name,
        version=args.version, widths=args.widths, negative_slope=args.negative_slope,
        complementary=args.complementary, keras_modules=args.keras_module or (),
    )  # fmt: skip
    artifact = read_artifact(path)
    h, w = artifact.config.input_size
    print(f"{path}: {len(classes)} classes, input {h}x{w}")
    print(parity_summary(artifact.meta["parity"]))
    return 0


# Options of `import` that only a Keras file takes: option -> argparse dest.
_KERAS_OPTIONS = {
    "--widths": "widths",
    "--negative-slope": "negative_slope",
    "--complementary": "complementary",
    "--keras-module": "keras_module",
}


def build_parser(prog: str = "python -m model") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="safetensors weights + config JSON -> TorchScript artifact")
    p.add_argument("--weights", required=True)
    p.add_argument("--config", required=True, help="ModelConfig JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--version", default="1")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "compile",
        help="torch.export + AOTInductor package for this machine (the bundled model: into the cache)",
    )
    p.add_argument("--model", help="a TorchScript artifact to compile (default: the bundled model)")
    p.add_argument("--out", help="where the package goes (with --model)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--precision", default="auto", choices=["auto", *PRECISIONS],
        help="auto: each precision the hardware has, the fastest within 0.005 held-out mIoU of fp32",
    )  # fmt: skip
    p.add_argument(
        "--data", default="synthetic", help="held-out data for auto: 'synthetic' (seed 2) or a folder"
    )
    p.add_argument("--count", type=int, default=64, help="held-out synthetic images")
    p.add_argument("--if-missing", action="store_true", help="the bundled model: only when not compiled yet")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "import",
        help="a TorchScript or Keras segmentation model of your own -> a chanseg artifact (served unchanged)",
        description="FILE: a torch.jit.save file whose module maps a normalised float (N, 3, H, W) batch to "
        "logits (N, classes, H, W), or to a dict holding them (--output-key); or a Keras 3 model (.keras, "
        ".h5) mapping (N, H, W, 3) to (N, H, W, classes), converted through Keras's torch backend with its "
        "parity checked; or weights only (.weights.h5) of chanseg's network built in Keras "
        "(model.keras_unet).",
    )
    p.add_argument("file", help="the TorchScript file, or the Keras file (.keras, .h5, .weights.h5)")
    p.add_argument("--classes", required=True, help="class names, comma-separated, one per output channel")
    p.add_argument(
        "--input-size", type=int, nargs=2, metavar=("H", "W"),
        help="the size images are resized to (needed for TorchScript; Keras: default the model's own input size)",
    )  # fmt: skip
    p.add_argument("--mean", type=float, nargs=3, help="default: ImageNet's; Keras files: 0 0 0")
    p.add_argument(
        "--std", type=float, nargs=3, help="default: ImageNet's; Keras files: 1 1 1 (pixels / 255)"
    )
    p.add_argument("--name", help="the model's name (default: the file's stem)")
    p.add_argument("--version", default="1")
    p.add_argument("--output-key", help="the logits' key when the module returns a dict (torchvision: out)")
    p.add_argument(
        "--keras-module", action="append", metavar="FILE",
        help="Keras: a Python file run first, defining and registering the model's custom layers (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--widths", type=int, nargs="+", help="weights only: the network's widths (default: 16 32 64 128 256)"
    )
    p.add_argument(
        "--negative-slope", type=float,
        help="weights only: 0 (default) for the seed's ReLU, else the LeakyReLU slope the network was trained with",
    )  # fmt: skip
    p.add_argument(
        "--complementary", action="store_true", help="weights only: blocks mix a and 1 - a (AAU-Net)"
    )
    p.add_argument("-o", "--out", required=True, help="the artifact to write")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("info", help="print an artifact's metadata")
    p.add_argument("--model", help="artifact (default: the bundled model)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("predict", help="write mask and overlay PNGs for images")
    _add_model_args(p)
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    p.add_argument("--out", default=".", help="output directory")
    p.add_argument(
        "--batch-size", type=int, default=8, help="images per forward pass (and in memory at once)"
    )
    p.set_defaults(func=cmd_predict)

    d = TrainOptions()
    p = sub.add_parser("train", help="train the network (synthetic shapes or DIR/images + DIR/masks)")
    p.add_argument("--data", default=d.data, help="'synthetic' or a folder with images/ and masks/")
    p.add_argument("--out", default=d.out)
    p.add_argument("--config", help="ModelConfig JSON (default: the default network)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=d.warmup_steps)
    p.add_argument("--crop", type=int, default=d.crop, help="train on random square crops (0: off)")
    p.add_argument("--val-size", dest="val_size", type=int, default=d.val_size)
    p.add_argument(
        "--train-size",
        dest="train_size",
        type=int,
        default=d.train_size,
        help="distinct synthetic training images (0: fresh ones throughout)",
    )
    p.add_argument("--val-every", dest="val_every", type=int, default=d.val_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help=DEVICE_HELP)
    p.add_argument("--num-workers", dest="num_workers", type=int, default=d.num_workers)
    p.add_argument("--init", help="safetensors weights to start from")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="per-class IoU, mIoU and pixel accuracy")
    _add_model_args(p)
    p.add_argument("--data", default="synthetic", help="'synthetic' or a folder with images/ and masks/")
    p.add_argument("--count", type=int, default=500, help="synthetic images")
    p.add_argument("--seed", type=int, default=2, help="synthetic seed (0 and 1 are training and validation)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sheet", help="PNG of synthetic images beside predicted and true masks")
    _add_model_args(p)
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--out", default="predictions.png")
    p.set_defaults(func=cmd_sheet)
    return parser


def main(argv: Optional[List[str]] = None, prog: str = "python -m model") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
