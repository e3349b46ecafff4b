"""Write skrr_export/data/calibration_prompts.txt: long, descriptive image captions for Skrr calibration.

The paper calibrates on 1k CC12M captions of 150-250 tokens, which are not redistributable. These are
composed by this script from phrase lists written for this project, with a fixed seed, so the file is
reproducible: `python scripts/make_calibration_prompts.py`.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "an elderly fisherman mending a green net", "a young violinist in a velvet jacket", "a red vintage bicycle",
    "a family of snow leopards", "a lighthouse keeper holding a brass lantern", "a small robot with round glass eyes",
    "a pair of ballet dancers mid-leap", "a glass teapot full of blooming jasmine", "a weathered wooden sailboat",
    "a street food vendor flipping dumplings", "a herd of wild horses", "a child building a sandcastle",
    "an astronaut in a scuffed white suit", "a stack of antique leather-bound books", "a fox with a bushy copper tail",
    "a potter shaping a tall clay vase", "a steam locomotive", "a bowl of ramen with a soft-boiled egg",
    "an owl perched on a mossy branch", "a cyclist in a yellow rain jacket", "a grand piano with its lid open",
    "a bride in an embroidered silk dress", "a vintage typewriter", "a koi pond with orange and white fish",
    "a knight in dented silver armor", "a hot air balloon striped in red and cream", "a tabby cat asleep on a windowsill",
    "a marathon runner crossing the finish line", "a greenhouse filled with orchids", "a blacksmith at a glowing forge",
    "a monk sweeping temple steps", "a surfer riding a turquoise wave", "a market stall piled with ripe tomatoes",
    "a giant tortoise", "a jazz trio on a small stage", "a paper lantern festival", "a row of colorful beach huts",
    "a chess player deep in thought", "a hummingbird hovering at a trumpet flower", "a baker dusting loaves with flour",
]
ACTIONS = [
    "seen from a low angle", "caught in a quiet moment", "framed by an arched doorway", "reflected in a still puddle",
    "surrounded by drifting dust motes", "partly hidden behind tall grass", "in sharp focus against a blurred crowd",
    "beside a chipped enamel mug", "under a sagging string of fairy lights", "next to a hand-painted wooden sign",
    "while snowflakes settle on every surface", "as a flock of pigeons takes off", "with steam curling into the cold air",
    "on a rain-slick cobblestone street", "at the edge of a crumbling stone wall", "beneath an enormous oak tree",
]
SETTINGS = [
    "in a narrow alley of an old Mediterranean harbor town", "on a windswept cliff above a gray northern sea",
    "inside a cluttered workshop with tools hanging on pegboards", "in a sunlit courtyard with terracotta pots",
    "on a misty mountain pass lined with prayer flags", "inside a cavernous train station with iron arches",
    "in a bamboo forest where the light falls in thin stripes", "on a salt flat that mirrors the sky",
    "in a neon-lit night market crowded with umbrellas", "at a quiet lakeside dock before sunrise",
    "inside a Gothic cathedral with stained glass windows", "in a desert canyon carved with red sandstone layers",
    "on the rooftop of a brick apartment building", "in a frozen birch forest after a heavy snowfall",
    "inside a retro diner with chrome stools and checkered floors", "in a terraced rice field on a steep hillside",
    "on a crowded beach promenade in late summer", "in a library with spiral staircases and tall ladders",
]
DETAILS = [
    "The textures are rendered in fine detail: frayed threads, peeling paint, tiny scratches and fingerprints.",
    "Small props fill the background, including a bicycle with a wicker basket, a sleeping dog and a chalkboard menu.",
    "A few handwritten notes are pinned to a cork board, their corners curling in the humid air.",
    "Colorful laundry hangs between the windows above, moving slightly in the breeze.",
    "Puddles on the ground catch fragments of color and light from the surroundings.",
    "Wildflowers in purple, yellow and white spill over the edges of the path.",
    "A thin layer of frost covers the railings, sparkling where the light touches it.",
    "Ceramic tiles in deep blue and ochre form a geometric pattern along the walls.",
    "The air is hazy with smoke from a nearby grill, softening the distant shapes.",
    "Shelves behind the subject are crowded with jars, bottles and mismatched cups.",
    "Distant figures walk in and out of frame, slightly blurred by motion.",
    "Fallen leaves in orange and rust gather in the corners and along the curb.",
]
LIGHTING = [
    "Warm golden-hour light rakes across the scene and casts long soft shadows.",
    "Cool blue twilight mixes with the warm glow of tungsten lamps.",
    "Overcast daylight gives even, diffuse illumination with gentle contrast.",
    "Hard midday sun creates crisp shadows and saturated colors.",
    "A single window lights the scene from the side, leaving deep shadows in the corners.",
    "Neon signs wash the surfaces in magenta and cyan reflections.",
    "Candlelight flickers, leaving most of the room in a warm, dim haze.",
    "Backlighting outlines the subject with a bright rim and a soft lens flare.",
]
STYLES = [
    "Shot on a full-frame camera with a 35 mm lens at f/2, shallow depth of field, natural color grading.",
    "Rendered as a detailed oil painting with visible brushstrokes and a rich, warm palette.",
    "In the style of a watercolor illustration with soft edges and paper texture.",
    "Photorealistic, high dynamic range, ultra-detailed, 8k resolution.",
    "Styled as a vintage film photograph with fine grain and slightly faded colors.",
    "A cinematic wide shot with anamorphic bokeh and a teal-and-orange grade.",
    "Drawn as a clean ink illustration with flat colors and bold outlines.",
    "A medium-format portrait with creamy bokeh and gentle skin tones.",
]
MOODS = [
    "The mood is calm and contemplative.", "The atmosphere feels nostalgic and a little melancholic.",
    "Everything suggests a busy, joyful day.", "There is a sense of quiet anticipation.",
    "The scene feels cozy, intimate and safe.", "It has an eerie, dreamlike stillness.",
]


def caption(rng: random.Random) -> str:
    parts = [
        f"A detailed image of {rng.choice(SUBJECTS)}, {rng.choice(ACTIONS)}, {rng.choice(SETTINGS)}.",
        *rng.sample(DETAILS, 3),
        rng.choice(LIGHTING),
        f"In the foreground there is {rng.choice(SUBJECTS)}, and further back {rng.choice(SUBJECTS)} {rng.choice(ACTIONS)}.",
        rng.choice(MOODS),
        rng.choice(STYLES),
    ]
    return " ".join(parts)


def main() -> None:
    rng = random.Random(20250211)
    prompts = sorted({caption(rng) for _ in range(600)})[:512]
    out = Path(__file__).resolve().parents[1] / "skrr_export" / "data" / "calibration_prompts.txt"
    out.write_text("\n".join(prompts) + "\n")
    print(f"wrote {len(prompts)} prompts to {out}")


if __name__ == "__main__":
    main()
