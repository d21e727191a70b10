"""Label tables of real segmentation data sets, as plain data.

Each table names its source (repository and file). Index = the integer stored in the label map after the
transform named in the table's comment; 255 is the ignore value unless a table says otherwise. Facts are taken
from the sources; the code is ours. See /work/shared/research/datasets_protocols.md §A1–A5 for the conventions.
"""

from __future__ import annotations

from typing import NamedTuple

# ---------------------------------------------------------------------------------------------------------------
# ADE20K / SceneParse150
# Source: open-mmlab/mmsegmentation mmseg/datasets/ade.py (ADE20KDataset.METAINFO['classes']).
# Index = train id after reduce_zero_label (raw 1..150 → 0..149; raw 0 "other objects" → 255).
# mmseg spells index 7 'bed ' with a trailing space; we strip it.
# ---------------------------------------------------------------------------------------------------------------

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",  # 0-9
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",  # 10-19
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",  # 20-29
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",  # 30-39
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace",  # 40-49
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway",  # 50-59
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",  # 60-69
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel",  # 70-79
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver",  # 80-89
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet",  # 90-99
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool",  # 100-109
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",  # 110-119
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",  # 120-129
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",  # 130-139
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",  # 140-149
)

# ---------------------------------------------------------------------------------------------------------------
# Cityscapes
# Source: mcordts/cityscapesScripts cityscapesscripts/helpers/labels.py (upstream HEAD 0bcc4a7; the columns
# category / categoryId / hasInstances are left out). Label maps hold `id`; train ids come from
# csCreateTrainIdLabelImgs or mmseg's converter. License plate (id -1) never appears in a PNG.
# ---------------------------------------------------------------------------------------------------------------


class CityscapesLabel(NamedTuple):
    name: str
    id: int
    train_id: int
    ignore_in_eval: bool
    color: tuple[int, int, int]


CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, True, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, True, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, True, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, True, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, True, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, True, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, True, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, False, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, False, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, True, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, True, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, False, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, False, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, False, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, True, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, True, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, True, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, False, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, True, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, False, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, False, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, False, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, False, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, False, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, False, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, False, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, False, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, False, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, False, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, True, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, True, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, False, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, False, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, False, (119, 11, 32)),
    CityscapesLabel("license plate", -1, -1, True, (0, 0, 142)),
)

# The 19 evaluated classes in train-id order (equals mmseg CityscapesDataset.METAINFO['classes']).
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(
    label.name for label in sorted(CITYSCAPES_LABELS, key=lambda label: label.train_id)
    if 0 <= label.train_id < 255)

# ---------------------------------------------------------------------------------------------------------------
# Pascal VOC 2012 (+ SBD aug)
# Source: open-mmlab/mmsegmentation mmseg/datasets/voc.py (PascalVOCDataset classes); 255 = boundary / void.
# ---------------------------------------------------------------------------------------------------------------

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette() -> list[int]:
    """The 256-colour VOC palette, flat [r0, g0, b0, r1, …] (768 ints) for PIL `Image.putpalette`.

    VOC devkit `VOClabelcolormap` rule: bits 0/1/2 of each successive 3-bit group of the label go to the
    red/green/blue bits 7, 6, 5, … (index 255 → (224, 224, 192), the void colour)."""
    flat: list[int] = []
    for label in range(256):
        rgb = [0, 0, 0]
        c = label
        for j in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - j)
            c >>= 3
        flat.extend(rgb)
    return flat


# ---------------------------------------------------------------------------------------------------------------
# COCO-Stuff-164k
# Raw label maps (stuffthingmaps_trainval2017): value = COCO category id - 1 (0..181), 255 = unlabeled.
# Raw names: nightrome/cocostuff labels.txt (which lists "id: name" with 0 = unlabeled, so raw = id - 1).
# The 11 thing ids COCO defines but never annotates keep their COCO names below; they never occur in a map.
# ---------------------------------------------------------------------------------------------------------------

COCO_STUFF_RAW_NAMES: tuple[str, ...] = (
    # things 0..90
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",  # 0-9
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep",  # 10-19
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",  # 20-29
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove",  # 30-39
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife",
    "spoon",  # 40-49
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",  # 50-59
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet",  # 60-69
    "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster",  # 70-79
    "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",  # 80-89
    "hair brush",  # 90
    # stuff 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",  # 91-99
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff",  # 100-109
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog",  # 110-119
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light",  # 120-129
    "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",  # 130-139
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road",
    "rock",  # 140-149
    "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other",  # 150-159
    "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable",  # 160-169
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood",
    "water-other", "waterdrops", "window-blind",  # 170-179
    "window-other", "wood",  # 180-181
)

# Raw ids with no annotation (street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender,
# hair brush): the raw ids missing from mmseg's clsID_to_trID.
COCO_STUFF_UNUSED: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

# The 171 classes in train-id order. Source: open-mmlab/mmsegmentation mmseg/datasets/coco_stuff.py
# (COCOStuffDataset classes; read at 0.x commit 186161e, same tuple in the 1.x METAINFO). It equals the raw names
# with the unused ids removed; no spelling differs from cocostuff labels.txt.
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",  # 0-9
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",  # 10-19
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase",
    "frisbee",  # 20-29
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle",  # 30-39
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",  # 40-49
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",  # 50-59
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven",  # 60-69
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",  # 70-79
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet",  # 80-89
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt",  # 90-99
    "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower",
    "fog", "food-other",  # 100-109
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light",
    "mat",  # 110-119
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",  # 120-129
    "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock",
    "roof",  # 130-139
    "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",  # 140-149
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick",  # 150-159
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other",  # 160-169
    "wood",  # 170
)

# Raw id → 171 train id. Source: open-mmlab/mmsegmentation tools/dataset_converters/coco_stuff164k.py
# (clsID_to_trID): the used raw ids in ascending order map to 0..170. 255 → 255 is left to the caller.
COCO_STUFF_RAW_TO_171: dict[int, int] = {
    raw: train_id
    for train_id, raw in enumerate(r for r in range(len(COCO_STUFF_RAW_NAMES)) if r not in COCO_STUFF_UNUSED)
}

# ---------------------------------------------------------------------------------------------------------------
# COCO-Stuff-27 (the coarse super-categories of IIC / PiCIE / STEGO)
# Coarse names: mhamilton723/STEGO src/train_segmentation.py get_class_labels("cocostuff27") @eb4d6b5.
# STEGO spells 14 "food" and 15 "furniture", the same as the thing classes 2 and 3; we add "-stuff" to the two
# stuff ones (COCO-Stuff's own way of telling e.g. "desk-stuff" from "desk") so that every name is unique.
# 0..11 are thing super-categories, 12..26 stuff (STEGO first_stuff_index = 12).
# ---------------------------------------------------------------------------------------------------------------

COCO_STUFF_27_CLASSES: tuple[str, ...] = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
    "person", "sports", "vehicle",  # 0-11 things
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",  # 12-26 stuff
)

# Raw id (0..181) → coarse id (0..26). Source: mhamilton723/STEGO src/data.py Coco.fine_to_coarse @eb4d6b5.
# STEGO keys every raw id 0..181, the 11 unused ones included; raw 255 (unlabeled) becomes -1 there.
COCO_STUFF_FINE_TO_COARSE: dict[int, int] = {
    0: 9, 1: 11, 2: 11, 3: 11, 4: 11, 5: 11, 6: 11, 7: 11, 8: 11, 9: 8, 10: 8, 11: 8,
    12: 8, 13: 8, 14: 8, 15: 7, 16: 7, 17: 7, 18: 7, 19: 7, 20: 7, 21: 7, 22: 7, 23: 7,
    24: 7, 25: 6, 26: 6, 27: 6, 28: 6, 29: 6, 30: 6, 31: 6, 32: 6, 33: 10, 34: 10, 35: 10,
    36: 10, 37: 10, 38: 10, 39: 10, 40: 10, 41: 10, 42: 10, 43: 5, 44: 5, 45: 5, 46: 5, 47: 5,
    48: 5, 49: 5, 50: 5, 51: 2, 52: 2, 53: 2, 54: 2, 55: 2, 56: 2, 57: 2, 58: 2, 59: 2,
    60: 2, 61: 3, 62: 3, 63: 3, 64: 3, 65: 3, 66: 3, 67: 3, 68: 3, 69: 3, 70: 3, 71: 0,
    72: 0, 73: 0, 74: 0, 75: 0, 76: 0, 77: 1, 78: 1, 79: 1, 80: 1, 81: 1, 82: 1, 83: 4,
    84: 4, 85: 4, 86: 4, 87: 4, 88: 4, 89: 4, 90: 4, 91: 17, 92: 17, 93: 22, 94: 20, 95: 20,
    96: 22, 97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 102: 12, 103: 17, 104: 17, 105: 23, 106: 15, 107: 15,
    108: 17, 109: 15, 110: 21, 111: 15, 112: 25, 113: 13, 114: 13, 115: 13, 116: 13, 117: 13, 118: 22, 119: 26,
    120: 14, 121: 14, 122: 15, 123: 22, 124: 21, 125: 21, 126: 24, 127: 20, 128: 22, 129: 15, 130: 17, 131: 16,
    132: 15, 133: 22, 134: 24, 135: 21, 136: 17, 137: 25, 138: 16, 139: 21, 140: 17, 141: 22, 142: 16, 143: 21,
    144: 21, 145: 25, 146: 21, 147: 26, 148: 21, 149: 24, 150: 20, 151: 17, 152: 14, 153: 21, 154: 26, 155: 15,
    156: 23, 157: 20, 158: 21, 159: 24, 160: 15, 161: 24, 162: 22, 163: 25, 164: 15, 165: 20, 166: 17, 167: 17,
    168: 22, 169: 14, 170: 18, 171: 18, 172: 18, 173: 18, 174: 18, 175: 18, 176: 18, 177: 26, 178: 26, 179: 19,
    180: 19, 181: 24,
}

# ---------------------------------------------------------------------------------------------------------------
# ddpm-segmentation few-shot data sets
# Source: yandex-research/ddpm-segmentation @9a13776: class names from src/data_util.py (the code's "***"
# separates part levels; its spellings, e.g. "picture / mirrow", are kept), number_class / ignore_label /
# training_number / testing_number from experiments/<name>/ddpm.json. Every class list has number_class entries.
# ade_bedroom_30 has NO background class: it is the first 30 of data_util's ade_bedroom_50_class (index 0 = wall).
# bedroom_28 keeps background at index 0 but ignores it (ignore_label 0), so 28 classes are scored.
# ---------------------------------------------------------------------------------------------------------------


class DdpmSegSet(NamedTuple):
    name: str
    classes: tuple[str, ...]
    ignore_label: int
    train_n: int
    test_n: int


DDPM_SEG_SETS: dict[str, DdpmSegSet] = {
    "bedroom_28": DdpmSegSet(
        "bedroom_28",
        ("background", "bed", "bed***footboard", "bed***headboard", "bed***side rail", "carpet", "ceiling",
         "chandelier / ceiling fan blade", "curtain", "cushion", "floor", "table/nightstand/dresser",
         "table/nightstand/dresser***top", "picture / mirrow", "pillow", "lamp***column", "lamp***shade", "wall",
         "window", "curtain rod", "window***frame", "chair", "picture / mirror***frame", "plinth",
         "door / door frame", "pouf", "wardrobe", "plant", "table staff"),
        0, 40, 20),
    "ffhq_34": DdpmSegSet(
        "ffhq_34",
        ("background", "head", "head***cheek", "head***chin", "head***ear", "head***ear***helix",
         "head***ear***lobule", "head***eye***bottom lid", "head***eye***eyelashes", "head***eye***iris",
         "head***eye***pupil", "head***eye***sclera", "head***eye***tear duct", "head***eye***top lid",
         "head***eyebrow", "head***forehead", "head***frown", "head***hair", "head***hair***sideburns",
         "head***jaw", "head***moustache", "head***mouth***inferior lip", "head***mouth***oral commissure",
         "head***mouth***superior lip", "head***mouth***teeth", "head***neck", "head***nose",
         "head***nose***ala of nose", "head***nose***bridge", "head***nose***nose tip", "head***nose***nostril",
         "head***philtrum", "head***temple", "head***wrinkles"),
        255, 20, 20),
    "cat_15": DdpmSegSet(
        "cat_15",
        ("background", "back", "belly", "chest", "leg", "paw", "head", "ear", "eye", "mouth", "tongue", "nose",
         "tail", "whiskers", "neck"),
        255, 30, 20),
    "horse_21": DdpmSegSet(
        "horse_21",
        ("background", "person", "back", "barrel", "bridle", "chest", "ear", "eye", "forelock", "head", "hoof",
         "leg", "mane", "muzzle", "neck", "nostril", "tail", "thigh", "saddle", "shoulder", "leg protection"),
        255, 30, 30),
    "celeba_19": DdpmSegSet(
        "celeba_19",
        ("background", "cloth", "ear_r", "eye_g", "hair", "hat", "l_brow", "l_ear", "l_eye", "l_lip", "mouth",
         "neck", "neck_l", "nose", "r_brow", "r_ear", "r_eye", "skin", "u_lip"),
        255, 20, 500),
    "ade_bedroom_30": DdpmSegSet(
        "ade_bedroom_30",
        ("wall", "bed", "floor", "table", "lamp", "ceiling", "painting", "windowpane", "pillow", "curtain",
         "cushion", "door", "chair", "cabinet", "chest", "mirror", "rug", "armchair", "book", "sconce", "plant",
         "wardrobe", "clock", "light", "flower", "vase", "fan", "box", "shelf", "television"),
        255, 50, 650),
}
