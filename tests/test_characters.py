import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from storygptv.characters import (
    CAST_IMAGE_SUFFIXES,
    canonical_name,
    cast_file_stem,
    find_character_mentions,
    find_character_tokens,
    load_character_image,
    normalize_characters,
    read_cast_folder,
)
from storygptv.testing import build_bpe_tokenizer


def tokens_of(tokenizer, caption, mention):
    ids = tokenizer(caption)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids)[mention.token_index]


@pytest.mark.parametrize(
    ("caption", "names", "expected"),
    [
        ("Fred and Barney are in the yard.", ["Barney", "Fred"], ["Fred", "Barney"]),
        ("fred, barney and WILMA talk.", ["Wilma", "Fred", "Barney"], ["Fred", "Barney", "Wilma"]),
        ("Fred's car is red.", ["Fred"], ["Fred"]),
        ("Freddy is not Fred.", ["Fred"], ["Fred"]),
        ("Mr  Slate shouts at Fred.", ["Mr Slate", "Fred"], ["Mr Slate", "Fred"]),
        ("Bamm Bamm and Bamm.", ["Bamm", "Bamm Bamm"], ["Bamm Bamm", "Bamm"]),
        ("Nobody is here.", ["Fred"], []),
    ],
)
def test_mentions_order_and_rules(caption, names, expected):
    assert [m.name for m in find_character_mentions(caption, names)] == expected


def test_whole_word_and_first_mention():
    caption = "Freddy sees Fred. Fred waves."
    (mention,) = find_character_mentions(caption, ["Fred"])
    assert caption[mention.start : mention.end] == "Fred"
    assert mention.start == caption.index(" Fred") + 1  # the first whole-word mention, not "Freddy"


def test_possessive_is_excluded_from_the_span():
    caption = "Barney’s hat and Fred's car."
    mentions = find_character_mentions(caption, ["Fred", "Barney"])
    assert [caption[m.start : m.end] for m in mentions] == ["Barney", "Fred"]


def test_token_index_is_last_subtoken_of_name(clip_tokenizer):
    caption = "Mr Slate and Tongtong, then Barney's dog."
    mentions = find_character_tokens(caption, ["Barney", "Tongtong", "Mr Slate"], clip_tokenizer)
    assert [m.name for m in mentions] == ["Mr Slate", "Tongtong", "Barney"]
    ids = clip_tokenizer(caption)["input_ids"]
    tokens = clip_tokenizer.convert_ids_to_tokens(ids)
    # "Tongtong" splits into several pieces with the tiny BPE; the fused token is the last one.
    offsets = clip_tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
    tong = mentions[1]
    pieces = [i for i, (s, e) in enumerate(offsets) if e > s and s < tong.end and e > tong.start]
    assert len(pieces) > 1 and tong.token_index == pieces[-1]
    assert offsets[tong.token_index][1] == tong.end
    assert tokens[mentions[0].token_index] == "e</w>"  # "Slate" -> s la t e</w>: the last piece
    assert tokens[mentions[2].token_index] == "barney</w>"
    assert tokens[mentions[2].token_index + 1] == "'</w>"  # the possessive is not part of the name


def test_case_insensitive_positions_identical(clip_tokenizer):
    a = find_character_tokens("FRED is here.", ["fred"], clip_tokenizer)
    b = find_character_tokens("fred is here.", ["Fred"], clip_tokenizer)
    assert [m.token_index for m in a] == [m.token_index for m in b] == [1]


def test_repeated_name_fused_at_first_mention(clip_tokenizer):
    (mention,) = find_character_tokens("Fred sees Fred.", ["Fred"], clip_tokenizer)
    assert mention.token_index == 1


def test_byte_level_style_tokenizer_offsets():
    # A case-preserving tokenizer (causal-LM style) also works through offsets.
    tokenizer = build_bpe_tokenizer(style="causal_lm")
    caption = "Barney, Fred and Mr Slate."
    mentions = find_character_tokens(caption, ["Fred", "Barney", "Mr Slate"], tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption)["input_ids"])
    assert [m.name for m in mentions] == ["Barney", "Fred", "Mr Slate"]
    offsets = tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
    for mention in mentions:
        start, end = offsets[mention.token_index]
        assert end == mention.end, (mention, tokens[mention.token_index])


def test_max_characters_and_warnings(clip_tokenizer):
    caption = "Fred, Barney, Wilma, Betty and Dino play."
    with pytest.warns(UserWarning, match=r"more than max_characters=2.*\['Wilma', 'Betty', 'Dino'\]"):
        kept = find_character_tokens(caption, ["Dino", "Betty", "Wilma", "Barney", "Fred"], clip_tokenizer, 2)
    assert [m.name for m in kept] == ["Fred", "Barney"]
    with pytest.warns(UserWarning, match=r"\['Pebbles'\] are not named"):
        find_character_tokens(caption, ["Fred", "Pebbles"], clip_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_character_tokens(caption, ["Fred", "Pebbles"], clip_tokenizer, warn=False)


def test_name_beyond_truncation_is_dropped(clip_tokenizer):
    caption = "a " * 100 + "Fred"
    with pytest.warns(UserWarning, match="not named"):
        assert find_character_tokens(caption, ["Fred"], clip_tokenizer) == []


def test_load_character_image_types(tmp_path):
    array = np.zeros((8, 6, 3), dtype=np.uint8)
    array[..., 0] = 255
    path = tmp_path / "fred.png"
    PIL.Image.fromarray(array).save(path)
    for image in (
        array,
        PIL.Image.fromarray(array),
        str(path),
        path,
        torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 8, 6),
    ):
        loaded = load_character_image(image)
        assert loaded.mode == "RGB" and loaded.size == (6, 8)
        assert loaded.getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(TypeError, match="'Fred'.*has type int"):
        load_character_image(3, name="Fred")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not be read"):
        load_character_image(tmp_path / "broken.png", name="Fred")
    with pytest.raises(ValueError, match="shape"):
        load_character_image(np.zeros((2, 2, 5), np.uint8))


def test_normalize_characters():
    image = np.zeros((4, 4, 3), np.uint8)
    shared = normalize_characters({"Fred": image}, 3)
    assert len(shared) == 3 and shared[0] is shared[2]
    assert normalize_characters(None, 2) == [{}, {}]
    with pytest.raises(ValueError, match="one dict per prompt"):
        normalize_characters([{"Fred": image}], 2)
    with pytest.raises(TypeError, match="`characters` has type str"):
        normalize_characters("Fred", 1)


def test_slow_tokenizer_is_a_clear_error():
    class SlowTokenizer:
        is_fast = False
        model_max_length = 77

    with pytest.raises(TypeError, match="needs a fast tokenizer"):
        find_character_tokens("Fred is here.", ["Fred"], SlowTokenizer())


# ------------------------------------------------------------------ reference images mean what they show
def _png_with_size(path, width, height):
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (Pillow reads the size from the header)."""
    import struct
    import zlib

    PIL.Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = struct.pack(">II", width, height)
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start : start + 17])))
    path.write_bytes(bytes(data))


def _write_png16(path, pixels):
    """A 16-bit RGB PNG of ``pixels`` ((H, W, 3) big-endian uint16)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _pixel(image):
    return load_character_image(image, name="Fred").getpixel((0, 0))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.full((2, 2, 3), (255, 0, 0), np.uint8), (255, 0, 0)),
        (np.full((2, 2, 3), (65535, 32896, 0), np.uint16), (255, 128, 0)),  # scaled by the 16-bit range
        (np.full((2, 2), 200, np.int64), (200, 200, 200)),  # integers in 0-255 are 8-bit
        (np.full((2, 2, 3), (1.0, 0.5, 0.0), np.float32), (255, 128, 0)),
        (np.full((2, 2, 4), (255, 0, 0, 0), np.uint8), (255, 255, 255)),  # transparent: white, not red
        (np.full((2, 2, 4), (255, 0, 0, 255), np.uint8), (255, 0, 0)),
        (np.full((2, 2, 4), (0, 0, 0, 128), np.uint8), (127, 127, 127)),  # half black over white
        (PIL.Image.new("RGBA", (2, 2), (0, 0, 255, 0)), (255, 255, 255)),
        (PIL.Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
        (PIL.Image.fromarray(np.full((2, 2), 32896, np.uint16)), (128, 128, 128)),  # mode I;16
        (PIL.Image.fromarray(np.full((2, 2), 32896, np.uint16)).convert("I"), (128, 128, 128)),
        (PIL.Image.fromarray(np.full((2, 2), 0.25, np.float32)), (64, 64, 64)),  # mode F
        (torch.full((3, 2, 2), 0.5), (128, 128, 128)),
        (torch.full((3, 2, 2), 7, dtype=torch.uint8), (7, 7, 7)),
    ],
)
def test_reference_pixels_mean_what_they_show(image, expected):
    assert _pixel(image) == expected


def test_image_files_mean_what_they_show(tmp_path):
    gray16 = tmp_path / "gray16.png"
    PIL.Image.fromarray(np.full((3, 3), 65535 // 4, np.uint16)).save(gray16)
    assert PIL.Image.open(gray16).mode == "I;16"
    assert _pixel(gray16) == (64, 64, 64)  # not white
    rgb48 = tmp_path / "rgb48.png"  # 16 bits per channel (Pillow cannot write it: raw PNG chunks)
    _write_png16(rgb48, np.full((2, 2, 3), (65535, 32896, 257), dtype=">u2"))
    assert _pixel(rgb48) == (255, 128, 1)
    rgba = tmp_path / "rgba.png"
    PIL.Image.new("RGBA", (3, 3), (255, 0, 0, 0)).save(rgba)
    assert _pixel(rgba) == (255, 255, 255)
    palette = PIL.Image.new("P", (3, 3), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)
    assert _pixel(path) == (255, 255, 255)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.full((2, 2, 3), 255.0, np.float32), r"'Fred'.*float image with values from 255 to 255.*\[0, 1\]"),
        (np.full((2, 2, 3), -0.5, np.float64), r"'Fred'.*float image"),
        (np.full((2, 2, 3), np.nan, np.float32), r"'Fred'.*float image"),
        (torch.full((3, 2, 2), 2.0), r"'Fred'.*float image"),
        (np.full((2, 2, 3), 300, np.int32), r"'Fred'.*int32 array with values from 300 to 300"),
        (np.zeros((0, 4, 3), np.uint8), r"'Fred'.*empty \(4x0 pixels\)"),
        (PIL.Image.new("RGB", (0, 0)), r"'Fred'.*empty \(0x0 pixels\)"),
    ],
)
def test_reference_images_that_would_be_wrong_are_errors(image, match):
    with pytest.raises(ValueError, match=match):
        load_character_image(image, name="Fred")


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (10_000, 10_000)])
def test_decompression_bombs_are_errors_naming_the_file(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    _png_with_size(path, width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning either: a clear error instead
        with pytest.raises(ValueError, match=r"'Fred' in '.*bomb\.png' is .*(too large|10000x10000)"):
            load_character_image(path, name="Fred")


# ------------------------------------------------------------------------------------------- annotation labels


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("fred", "Fred"),
        ("FRED'S", "Fred"),
        ("Fred’s", "Fred"),
        ("Mr. Slate", "Mr Slate"),
        ("mr_slate", "Mr Slate"),
        ("  Mr   Slate ", "Mr Slate"),
        ("Freddy", None),
        ("Fred and Barney", None),  # a whole label, not a search: see find_character_mentions
        ("", None),
    ],
)
def test_canonical_name(label, expected):
    assert canonical_name(label, ["Fred", "Barney", "Mr Slate"]) == expected


def test_canonical_name_aliases_are_keys():
    aliases = {"slate": "Mr Slate", "mister slate": "Mr Slate"}
    assert canonical_name("Slate's", ["Mr Slate"], aliases) == "Mr Slate"
    assert canonical_name("Mister  Slate", ["Mr Slate"], aliases) == "Mr Slate"


# ------------------------------------------------------------------------------------------- cast folders


def _touch(folder, *names):
    """A folder with tiny images under ``names`` (other files are empty)."""
    folder.mkdir(exist_ok=True)
    for name in names:
        if name.lower().endswith(CAST_IMAGE_SUFFIXES):
            PIL.Image.new("RGB", (4, 4)).save(folder / name)
        else:
            (folder / name).touch()


def test_cast_folder_names_and_suffixes(tmp_path):
    _touch(tmp_path / "cast", "Mr_Slate.png", "Fred.JPG", "Bamm__Bamm.webp", "notes.txt", ".hidden.png")
    (tmp_path / "cast" / "folder.png").mkdir()
    cast = read_cast_folder(tmp_path / "cast")
    assert list(cast) == ["Bamm Bamm", "Fred", "Mr Slate"]  # file-name order
    assert cast["Mr Slate"] == tmp_path / "cast" / "Mr_Slate.png"
    assert all(load_character_image(path, name).size == (4, 4) for name, path in cast.items())
    assert ".bmp" in CAST_IMAGE_SUFFIXES
    assert cast_file_stem("Mr  Slate") == "Mr_Slate"


def test_cast_folder_errors(tmp_path):
    with pytest.raises(NotADirectoryError, match="is not a folder; pass a folder of reference images"):
        read_cast_folder(tmp_path / "nope")
    _touch(tmp_path / "empty", "notes.txt")
    with pytest.raises(ValueError, match=r"holds no image \(.png, .jpg.*e\.g\. Fred\.png or Mr_Slate\.png"):
        read_cast_folder(tmp_path / "empty")
    _touch(tmp_path / "twice", "Mr_Slate.png", "Mr Slate.jpg")
    with pytest.raises(ValueError, match=r"two images of 'Mr Slate' \(Mr Slate\.jpg and Mr_Slate\.png\)"):
        read_cast_folder(tmp_path / "twice")
