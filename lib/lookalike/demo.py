"""Build the small demo archive `make run` catalogs when no IMAGES folder is given.

Real photos shipped inside scikit-image, plus copies of some of them renamed, resized,
recompressed, cropped and mirrored, so a first run shows exact copies, near-duplicates and
similarity categories at once. Deterministic; does nothing when the archive exists.

    python -m lookalike.demo OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

# Colour and grey photographs (not the synthetic test patterns) in skimage's data folder.
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png",
          "coins.png", "moon.png"]
MARKER = ".lookalike-demo"


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def build(out: Path) -> list[Path]:
    """Write the archive under `out`; returns the files written (empty when it already existed)."""
    if (out / MARKER).exists():
        return []
    src = skimage_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(im: Image.Image, rel: str, **kw: object) -> None:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        im.save(dest, **kw)
        written.append(dest)

    originals: dict[str, Image.Image] = {}
    for i, name in enumerate(PHOTOS):
        im = Image.open(src / name).convert("RGB")
        originals[name] = im
        save(im, f"2024/{1 + i % 3:02d}/{Path(name).stem}.jpg", quality=95)

    # Exact copies: the same bytes under another name and folder.
    for name in ("astronaut.png", "coffee.png"):
        first = out / f"2024/{1 + PHOTOS.index(name) % 3:02d}/{Path(name).stem}.jpg"
        dest = out / "inbox" / f"copy of {Path(name).stem}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, dest)
        written.append(dest)

    # Near-duplicates: what happens to photos as they travel.
    chelsea, coffee, rocket, astronaut = (originals[n] for n in
                                          ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"))
    save(chelsea.resize((chelsea.width // 2, chelsea.height // 2), Image.Resampling.LANCZOS),
         "2025/shared/chelsea_small.jpg", quality=85)
    save(coffee, "2025/shared/coffee_recompressed.jpg", quality=35)
    w, h = rocket.size
    save(rocket.crop((w // 20, h // 20, w - w // 20, h - h // 20)), "2025/shared/rocket_cropped.png")
    save(ImageOps.mirror(astronaut), "2025/shared/astronaut_mirrored.jpg", quality=90)
    save(ImageOps.grayscale(chelsea).convert("RGB"), "2025/shared/chelsea_grey.webp", quality=90)
    (out / MARKER).write_text("demo archive built by lookalike.demo\n")
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lookalike.demo OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    written = build(out)
    if written:
        print(f"demo archive: {len(written)} files in {out}", file=sys.stderr)
    else:
        print(f"demo archive: {out} (already built)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
