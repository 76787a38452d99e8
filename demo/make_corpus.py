"""Write the offline demo's text: nothing downloaded, all of it generated here from small grammars.

Two kinds of text, so fine-tuning has something to learn:
  stories.txt            short fables, to pretrain a small base model from scratch;
  weather-train.txt      weather reports, the fine-tuning data;
  weather-test.txt       more weather reports (another seed), to evaluate before and after.
Documents are separated by blank lines, which is how lmtune splits a .txt file.

    python demo/make_corpus.py demo/out
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

ANIMALS = ["fox", "rabbit", "owl", "bear", "mouse", "wolf", "duck", "cat", "dog", "goat", "deer", "frog"]
ADJ = ["small", "old", "brave", "clever", "quiet", "hungry", "kind", "proud", "lazy", "curious"]
PLACES = ["river", "forest", "hill", "village", "meadow", "lake", "farm", "garden", "bridge", "mountain"]
THINGS = ["bread", "apples", "a red ball", "honey", "a map", "seeds", "a lantern", "a song", "berries", "a key"]
NAMES = ["Tom", "Lina", "Ada", "Ben", "Mira", "Otto", "Sara", "Finn", "Ivy", "Leo"]
MORALS = [
    "Slow and steady wins the race.",
    "A friend in need is a friend indeed.",
    "Kindness is never wasted.",
    "Look before you leap.",
    "Pride comes before a fall.",
    "Many hands make light work.",
]
CITIES = [
    "Oslo",
    "Lisbon",
    "Cairo",
    "Lima",
    "Tokyo",
    "Nairobi",
    "Dublin",
    "Quito",
    "Hanoi",
    "Perth",
    "Bergen",
    "Denver",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SKIES = ["sunny", "cloudy", "partly cloudy", "overcast", "foggy", "clear", "windy", "stormy"]
RAIN = ["light rain", "heavy rain", "showers", "drizzle", "snow", "sleet", "thunderstorms", "no rain"]
WINDS = ["north", "south", "east", "west", "north-west", "south-east"]


def story(r: random.Random) -> str:
    """A fable. It shares words with the weather reports (days, cities, skies, numbers) but not their form."""
    a, b = r.sample(ANIMALS, 2)
    place, thing, name = r.choice(PLACES), r.choice(THINGS), r.choice(NAMES)
    lines = [
        f"Once upon a time, a {r.choice(ADJ)} {a} named {name} lived near the {place} outside {r.choice(CITIES)}.",
        f"It was a {r.choice(SKIES)} {r.choice(DAYS)}, the air was {r.randint(-5, 35)} degrees,"
        f" and the wind came from the {r.choice(WINDS)}.",
        f"Every morning the {a} went to the {r.choice(PLACES)} to look for {thing}.",
        f'One day the {a} met a {r.choice(ADJ)} {b}, who said, "I will help you find {thing}."',
    ]
    if r.random() < 0.5:
        lines.append(
            f"They walked past the {r.choice(PLACES)} and over the {r.choice(PLACES)} until the sun went down."
        )
    else:
        lines.append(f"But the {b} wanted {r.choice(THINGS)} instead, and the two friends argued all day.")
    if r.random() < 0.4:
        lines.append(
            f"Then came {r.choice(RAIN)}, and they waited {r.randint(2, 60)} minutes under a {r.choice(ADJ)} tree."
        )
    lines.append(f"At last {name} the {a} found {thing} under an old tree by the {r.choice(PLACES)}.")
    lines.append(r.choice(MORALS))
    return " ".join(lines)


def report(r: random.Random) -> str:
    high = r.randint(-5, 35)
    low = high - r.randint(3, 12)
    return (
        f"Weather report for {r.choice(CITIES)}, {r.choice(DAYS)}: {r.choice(SKIES)} in the morning, "
        f"{r.choice(RAIN)} in the afternoon. High of {high} degrees, low of {low}. "
        f"Wind from the {r.choice(WINDS)} at {r.randint(5, 60)} km/h. "
        f"Chance of rain {r.randint(0, 10) * 10} percent."
    )


def write(path: Path, make, n: int, seed: int) -> None:
    r = random.Random(seed)
    path.write_text("\n\n".join(make(r) for _ in range(n)) + "\n", encoding="utf-8")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write(out / "stories.txt", story, 3000, seed=1)
    write(out / "weather-train.txt", report, 2000, seed=2)
    write(out / "weather-test.txt", report, 300, seed=3)
    for f in sorted(out.glob("*.txt")):
        print(f"wrote {f} ({f.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo/out"))
