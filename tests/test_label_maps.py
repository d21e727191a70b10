"""The label tables of difffeat.data.label_maps against facts copied independently from their sources
(datasets_protocols.md §A1–A5, mmseg, cityscapesScripts, STEGO, ddpm-segmentation)."""

import pytest

from difffeat.data import label_maps as lm


def test_table_lengths():
    assert len(lm.ADE20K_CLASSES) == 150
    assert len(lm.CITYSCAPES_CLASSES) == 19
    assert len(lm.VOC_CLASSES) == 21
    assert len(lm.COCO_STUFF_RAW_NAMES) == 182
    assert len(lm.COCO_STUFF_CLASSES) == 171
    assert len(lm.COCO_STUFF_27_CLASSES) == 27
    assert len(lm.COCO_STUFF_RAW_TO_171) == 171
    assert len(lm.voc_palette()) == 768


@pytest.mark.parametrize("table", [
    lm.ADE20K_CLASSES, lm.CITYSCAPES_CLASSES, lm.VOC_CLASSES, lm.COCO_STUFF_RAW_NAMES, lm.COCO_STUFF_CLASSES,
    lm.COCO_STUFF_27_CLASSES, tuple(label.name for label in lm.CITYSCAPES_LABELS),
    *(s.classes for s in lm.DDPM_SEG_SETS.values()),
])
def test_names_are_unique_and_clean(table):
    assert len(set(table)) == len(table)
    assert all(isinstance(n, str) and n and n == n.strip() for n in table)


def test_ade20k_spot_values():
    assert lm.ADE20K_CLASSES[:10] == ("wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed",
                                      "windowpane", "grass")
    assert lm.ADE20K_CLASSES[44] == "chest of drawers"
    assert lm.ADE20K_CLASSES[89] == "television receiver"
    assert lm.ADE20K_CLASSES[123] == "trade name"
    assert lm.ADE20K_CLASSES[140:] == ("pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
                                       "radiator", "glass", "clock", "flag")


def test_cityscapes_labels():
    labels = lm.CITYSCAPES_LABELS
    assert [label.id for label in labels] == [*range(34), -1]
    by_id = {label.id: label for label in labels}
    assert by_id[7].name == "road" and by_id[7].train_id == 0 and by_id[7].color == (128, 64, 128)
    assert by_id[33].name == "bicycle" and by_id[33].train_id == 18 and by_id[33].color == (119, 11, 32)
    assert by_id[9].name == "parking" and by_id[9].train_id == 255 and by_id[9].ignore_in_eval
    assert by_id[-1].name == "license plate" and by_id[-1].train_id == -1 and by_id[-1].ignore_in_eval
    # Exactly the 19 train ids are evaluated, each once.
    evaluated = [label for label in labels if not label.ignore_in_eval]
    assert sorted(label.train_id for label in evaluated) == list(range(19))
    assert all(label.train_id in (255, -1) for label in labels if label.ignore_in_eval)
    assert all(len(label.color) == 3 and all(0 <= c <= 255 for c in label.color) for label in labels)


def test_cityscapes_classes_match_mmseg():
    assert lm.CITYSCAPES_CLASSES == (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")


def test_voc():
    assert lm.VOC_CLASSES[0] == "background" and lm.VOC_CLASSES[15] == "person" and lm.VOC_CLASSES[20] == "tvmonitor"
    flat = lm.voc_palette()
    colour = {i: tuple(flat[3 * i:3 * i + 3]) for i in range(256)}
    assert colour[0] == (0, 0, 0)
    assert colour[1] == (128, 0, 0)
    assert colour[2] == (0, 128, 0)
    assert colour[15] == (192, 128, 128)
    assert colour[20] == (0, 64, 128)
    assert colour[255] == (224, 224, 192)
    # The 21-colour table of mmseg voc.py, copied.
    mmseg = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
             (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
             (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128)]
    assert [colour[i] for i in range(21)] == mmseg
    assert len(set(colour.values())) == 256


def test_voc_palette_works_with_pil():
    from PIL import Image

    img = Image.new("P", (2, 1))
    img.putpalette(lm.voc_palette())
    img.putpixel((0, 0), 15)
    img.putpixel((1, 0), 255)
    rgb = img.convert("RGB")
    assert rgb.getpixel((0, 0)) == (192, 128, 128) and rgb.getpixel((1, 0)) == (224, 224, 192)


def test_coco_stuff_unused_ids_carry_the_unannotated_coco_names():
    assert lm.COCO_STUFF_UNUSED == (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
    assert {lm.COCO_STUFF_RAW_NAMES[i] for i in lm.COCO_STUFF_UNUSED} == {
        "blender", "desk", "door", "eye glasses", "hair brush", "hat", "mirror", "plate", "shoe", "street sign",
        "window"}
    assert set(lm.COCO_STUFF_RAW_TO_171).isdisjoint(lm.COCO_STUFF_UNUSED)


def test_coco_stuff_raw_names_spot_values():
    names = lm.COCO_STUFF_RAW_NAMES
    assert names[0] == "person" and names[90] == "hair brush" and names[91] == "banner"
    assert names[181] == "wood" and names[101] == "ceiling-other" and names[170] == "wall-brick"


def test_coco_stuff_171_is_the_raw_names_without_the_unused_ids():
    kept = tuple(n for i, n in enumerate(lm.COCO_STUFF_RAW_NAMES) if i not in lm.COCO_STUFF_UNUSED)
    assert lm.COCO_STUFF_CLASSES == kept
    for raw, train_id in lm.COCO_STUFF_RAW_TO_171.items():
        assert lm.COCO_STUFF_CLASSES[train_id] == lm.COCO_STUFF_RAW_NAMES[raw]


def test_coco_stuff_raw_to_171():
    mapping = lm.COCO_STUFF_RAW_TO_171
    assert sorted(mapping.values()) == list(range(171))
    assert sorted(mapping) == sorted(set(range(182)) - set(lm.COCO_STUFF_UNUSED))
    assert all(mapping[k] == k for k in range(11))
    examples = {12: 11, 26: 24, 30: 26, 45: 40, 66: 60, 69: 61, 71: 62, 83: 73, 91: 80, 181: 170}
    assert {k: mapping[k] for k in examples} == examples
    assert 255 not in mapping


def _coarse_table_from_the_brief() -> dict[int, int]:
    """datasets_protocols.md §A4, written out by range / list (independent of the module's literal)."""
    table: dict[int, int] = {0: 9}
    for lo, hi, coarse in [(1, 8, 11), (9, 14, 8), (15, 24, 7), (25, 32, 6), (33, 42, 10), (43, 50, 5),
                           (51, 60, 2), (61, 70, 3), (71, 76, 0), (77, 82, 1), (83, 90, 4)]:
        table.update({raw: coarse for raw in range(lo, hi + 1)})
    stuff = {
        17: [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167],
        22: [93, 96, 118, 123, 128, 133, 141, 162, 168],
        20: [94, 95, 127, 150, 157, 165],
        15: [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164],
        25: [98, 112, 137, 145, 163],
        16: [99, 131, 138, 142],
        13: [100, *range(113, 118)],
        12: [101, 102],
        23: [105, 156],
        21: [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158],
        26: [119, 147, 154, 177, 178],
        14: [120, 121, 152, 169],
        24: [126, 134, 149, 159, 161, 181],
        18: list(range(170, 177)),
        19: [179, 180],
    }
    for coarse, raws in stuff.items():
        for raw in raws:
            assert raw not in table
            table[raw] = coarse
    return table


def test_coco_stuff_fine_to_coarse():
    f2c = lm.COCO_STUFF_FINE_TO_COARSE
    assert sorted(f2c) == list(range(182))  # STEGO keys the unused ids too
    assert set(f2c.values()) == set(range(27))
    assert f2c == _coarse_table_from_the_brief()
    # Spot values, with names: person → person, car → vehicle, wall-brick → wall, sky-other → sky.
    names = lm.COCO_STUFF_27_CLASSES
    assert names[f2c[0]] == "person" and names[f2c[2]] == "vehicle"
    assert names[f2c[170]] == "wall" and names[f2c[156]] == "sky" and names[f2c[101]] == "ceiling"
    # Things map to 0..11, stuff to 12..26.
    assert all((f2c[raw] < 12) == (raw <= 90) for raw in range(182))


def test_coco_stuff_27_names_are_stegos_up_to_the_stuff_suffix():
    stego = ("electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
             "person", "sports", "vehicle", "ceiling", "floor", "food", "furniture", "rawmaterial", "textile",
             "wall", "window", "building", "ground", "plant", "sky", "solid", "structural", "water")
    assert tuple(n.removesuffix("-stuff") for n in lm.COCO_STUFF_27_CLASSES) == stego


# name: (number of class entries, ignore_label, train N, test N), from experiments/<name>/ddpm.json
DDPM_CONFIGS = {
    "bedroom_28": (29, 0, 40, 20),
    "ffhq_34": (34, 255, 20, 20),
    "cat_15": (15, 255, 30, 20),
    "horse_21": (21, 255, 30, 30),
    "celeba_19": (19, 255, 20, 500),
    "ade_bedroom_30": (30, 255, 50, 650),
}


def test_ddpm_seg_sets():
    assert set(lm.DDPM_SEG_SETS) == set(DDPM_CONFIGS)
    for key, (n, ignore, train_n, test_n) in DDPM_CONFIGS.items():
        s = lm.DDPM_SEG_SETS[key]
        assert s.name == key
        assert (len(s.classes), s.ignore_label, s.train_n, s.test_n) == (n, ignore, train_n, test_n), key
    for key in ("bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19"):
        assert lm.DDPM_SEG_SETS[key].classes[0] == "background"
    # ade_bedroom_30 has no background class: index 0 is "wall".
    assert lm.DDPM_SEG_SETS["ade_bedroom_30"].classes[0] == "wall"
    assert lm.DDPM_SEG_SETS["bedroom_28"].classes[-1] == "table staff"
    assert lm.DDPM_SEG_SETS["ffhq_34"].classes[-1] == "head***wrinkles"
    assert lm.DDPM_SEG_SETS["horse_21"].classes[-1] == "leg protection"
