"""Draw the example spec's small placeholder images (deterministic; committed outputs).

- assets/pose.png: a stick-figure pose drawing, used as a canny control source;
- assets/refs/luca_*.png: reference images of `luca` for consistency scoring.
Run: python scripts/make_example_assets.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "specs" / "examples" / "assets"


def pose(size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    s = size / 64
    def line(*pts):
        d.line([(x * s, y * s) for x, y in pts], fill="black", width=max(1, int(2 * s)))
    d.ellipse([26 * s, 6 * s, 38 * s, 18 * s], outline="black", width=max(1, int(2 * s)))  # head
    line((32, 18), (32, 38))           # torso
    line((32, 22), (20, 30), (14, 22))  # left arm, raised
    line((32, 22), (44, 30), (50, 36))  # right arm
    line((32, 38), (24, 52), (20, 60))  # left leg, running
    line((32, 38), (42, 50), (48, 58))  # right leg
    return img


def reference(variant: int, size: int = 64) -> Image.Image:
    backgrounds = [(120, 180, 230), (235, 215, 170), (90, 140, 200)]
    img = Image.new("RGB", (size, size), backgrounds[variant % 3])
    d = ImageDraw.Draw(img)
    dx = (variant - 1) * 4
    d.ellipse([18 + dx, 14, 46 + dx, 46], fill=(240, 200, 170))                  # face
    d.pieslice([16 + dx, 8, 48 + dx, 36], 180, 360, fill=(110, 70, 35))          # brown hair
    d.ellipse([25 + dx, 27, 30 + dx, 32], fill=(40, 160, 70))                    # green eyes
    d.ellipse([34 + dx, 27, 39 + dx, 32], fill=(40, 160, 70))
    d.arc([26 + dx, 32, 38 + dx, 40], 20, 160, fill=(150, 60, 60), width=2)      # smile
    d.rectangle([20 + dx, 46, 44 + dx, 64], fill=(60, 110, 200))                 # shirt
    return img


def main() -> None:
    (OUT / "refs").mkdir(parents=True, exist_ok=True)
    pose().save(OUT / "pose.png", optimize=True)
    for i in range(3):
        reference(i).save(OUT / "refs" / f"luca_{i + 1}.png", optimize=True)


if __name__ == "__main__":
    main()
