"""Text-to-image end to end on an untrained ofa-micro (code_image_size 64: 8 x 8 = 64 codes) with an untrained
vqgan-micro tokenizer (512 codes): bundles that carry the tokenizer, decoding constrained to exactly the grid of
the tokenizer's codes, images ranked by the model's own image-text matching, the CLI and the HTTP endpoint.

Untrained weights make the pictures noise, but every number is checked against an independent computation: the
PNGs against the tokenizer's decoding of the returned codes, the ranking scores against `score_candidates`.
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from ofa_model.bundle import BundleError, bundle_tokenizer_dir, load_bundle, read_bundle_config, save_bundle
from ofa_model.generation import GenerationConfig, SpecialIds, generate, score_candidates
from ofa_model.predictor import OFAPredictor, PredictorLimits
from ofa_model.preprocess import pad_sequences
from ofa_model.tasks import TASKS, code_constraint, inference_request
from ofa_model.vqgan import (
    VQGAN,
    load_tokenizer,
    save_tokenizer,
    tokenizer_config,
    tokenizer_digest,
    weights_digest,
)
from tests.serving import micro_image_bundle

pytestmark = pytest.mark.timeout(600)

GRID = 64  # (64 px / 8)^2
CODES = 512  # vqgan-micro's codebook


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_image_bundle(tmp_path_factory.mktemp("t2i") / "t2i")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return micro_image_bundle(tmp_path_factory.mktemp("plain") / "plain", tokenizer=False)


@pytest.fixture(scope="module")
def predictor(bundle):
    return OFAPredictor.from_bundle(bundle, max_batch_size=8)


def reasons(out: list[dict]) -> list[str | None]:
    return [o["error"]["reason"] if "error" in o else None for o in out]


def same_images(a: dict, b: dict) -> None:
    """The same PNGs, codes and ranks; scores to rounding (a row's place in a batch may change their last bits)."""
    assert (a["width"], a["height"]) == (b["width"], b["height"]) and len(a["images"]) == len(b["images"])
    for x, y in zip(a["images"], b["images"], strict=True):
        assert x.keys() == y.keys() and (x["png"], x["rank"], x.get("codes")) == (y["png"], y["rank"], y.get("codes"))
        assert x["logprob"] == pytest.approx(y["logprob"], rel=1e-5) and x["itm_score"] == pytest.approx(
            y["itm_score"], abs=1e-5)


def pixels_of(png_b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    assert img.format == "PNG" and img.mode == "RGB"
    return np.asarray(img)


# ---------------------------------------------------------------------------------------------- bundles


def test_a_bundle_carries_its_tokenizer_and_refuses_one_too_large(bundle, plain, tmp_path):
    b = load_bundle(bundle)
    source = load_tokenizer(bundle.with_name(bundle.name + "-tokenizer"))
    assert b.image_tokenizer.config == source.config == tokenizer_config("vqgan-micro")
    theirs = source.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in b.image_tokenizer.model.state_dict().items())
    assert read_bundle_config(bundle)["image_tokenizer"] == "image_tokenizer"
    assert load_bundle(plain).image_tokenizer is None and "image_tokenizer" not in read_bundle_config(plain)
    # overwriting: the tokenizer's directory is the bundle's own, not a foreign file; a loaded Tokenizer is taken
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    save_bundle(copy, b.model, b.vocab, preprocess=b.preprocess, image_tokenizer=b.image_tokenizer, overwrite=True)
    assert load_bundle(copy).image_tokenizer.config.n_embed == CODES

    torch.manual_seed(0)
    big = save_tokenizer(tmp_path / "big", VQGAN(tokenizer_config("vqgan-micro", n_embed=8193)))
    with pytest.raises(BundleError, match="8193 codes .* more than the vocabulary's 8192 code tokens"):
        save_bundle(tmp_path / "refused", b.model, b.vocab, preprocess=b.preprocess, image_tokenizer=big)
    assert not (tmp_path / "refused").exists()
    shutil.rmtree(copy / "image_tokenizer")  # a tokenizer swapped after saving is refused when loading
    shutil.copytree(big, copy / "image_tokenizer")
    with pytest.raises(BundleError, match="image_tokenizer: the image tokenizer 'vqgan-micro' has 8193 codes"):
        load_bundle(copy)
    shutil.rmtree(copy / "image_tokenizer")
    with pytest.raises(BundleError, match="image_tokenizer is missing"):
        load_bundle(copy)


def test_the_tokenizer_inside_a_bundle_keeps_the_digest_of_the_one_saved_alone(bundle, plain, tmp_path):
    """The identity that image-codes corpora record: the standalone tokenizer's, its copy in a model bundle's and a
    bundle re-saved from a loaded one's are all the digest of the same tensors, read from config.json alone."""
    standalone = bundle.with_name(bundle.name + "-tokenizer")
    digest = weights_digest(load_tokenizer(standalone).model.state_dict())
    assert bundle_tokenizer_dir(bundle) == (bundle / "image_tokenizer").resolve()
    assert tokenizer_digest(standalone) == tokenizer_digest(bundle_tokenizer_dir(bundle)) == digest
    b = load_bundle(bundle)
    assert b.image_tokenizer.digest == digest
    save_bundle(tmp_path / "again", b.model, b.vocab, preprocess=b.preprocess, image_tokenizer=b.image_tokenizer)
    assert tokenizer_digest(bundle_tokenizer_dir(tmp_path / "again")) == digest
    assert bundle_tokenizer_dir(plain) is None


# ---------------------------------------------------------------------------------------------- decoding


def test_decoding_gives_exactly_the_grid_of_tokenizer_codes(predictor):
    model, vocab, pcfg = predictor.model, predictor.vocab, predictor.preprocess
    reqs = [inference_request(TASKS["text_to_image"], {"text": t}, vocab, pcfg) for t in ("a red circle", "a cat")]
    src = pad_sequences([r.source for r in reqs], vocab.pad_id)
    ids, lo = SpecialIds.of(vocab), vocab.code_offset
    masks = torch.ones(2, dtype=torch.bool)
    free = generate(model, src, cfg=GenerationConfig(beam_size=1, max_len_b=8), ids=ids, code_masks=masks)
    assert any(not lo <= t < lo + CODES for hs in free for t in hs[0].tokens)  # unconstrained, it strays
    settings = [GenerationConfig(beam_size=1, max_len_b=GRID, min_len=GRID)] + [
        GenerationConfig(sampling=True, top_k=256, num_return_sequences=2, max_len_b=GRID, min_len=GRID, seed=s)
        for s in (0, 1)]
    sampled = {}
    for cfg in settings:
        hyps = generate(model, src, cfg=cfg, ids=ids, constraints=code_constraint(vocab, CODES), code_masks=masks)
        for hs in hyps:
            assert len(hs) == cfg.num_return_sequences
            for h in hs:
                assert len(h.tokens) == GRID and all(lo <= t < lo + CODES for t in h.tokens)
                assert len(h.token_scores) == GRID + 1  # EOS right after the grid, never before
        sampled[cfg.seed] = [[h.tokens for h in hs] for hs in hyps]
    assert sampled[0] != sampled[1]
    # a seeded example draws from its own generator: alone, it samples what it sampled beside another
    [alone] = generate(model, src[:1, :len(reqs[0].source)], cfg=settings[1], ids=ids,
                       constraints=code_constraint(vocab, CODES), code_masks=masks[:1])
    assert [h.tokens for h in alone] == sampled[0][0]


def test_images_are_ranked_by_the_models_own_image_text_matching(predictor):
    model, vocab, pcfg, tok = predictor.model, predictor.vocab, predictor.preprocess, predictor.image_tokenizer
    good = {"text": "a red circle", "num_samples": 3, "seed": 5, "return_codes": True}
    items = [good, {"text": "   "}, {"text": "x" * 5000}, {"text": "a cat", "num_samples": 9},
             {"text": "a cat", "num_samples": "3"}, {"text": "a cat", "decoding": {"max_len_b": 10}},
             {"text": "a cat", "seed": 1, "decoding": {"seed": 2}}, {"text": "a cat", "return_codes": "yes"}, good]
    out = predictor.predict("text_to_image", items)
    assert reasons(out) == [None, "empty_text", "limit_exceeded", "limit_exceeded", "bad_setting", "bad_setting",
                            "bad_setting", "bad_type", None]
    assert "num_samples=9 is over the limit of 8" in out[3]["error"]["message"]
    assert "exactly the model's 64 codes" in out[5]["error"]["message"]
    res = out[0]
    assert (res["width"], res["height"]) == (64, 64) and [im["rank"] for im in res["images"]] == [1, 2, 3]
    same_images(out[-1], res)  # the same seed, the same images (and a neighbour's draws change nothing)
    yes, no = vocab.encode(" yes"), vocab.encode(" no")
    for image in res["images"]:
        codes = image["codes"]
        assert len(codes) == GRID and all(0 <= c < CODES for c in codes)
        expected = tok.decode_codes(torch.tensor([codes]))[0]  # (64, 64, 3) uint8, decoded alone, not in a batch
        np.testing.assert_allclose(pixels_of(image["png"]), expected, atol=1)  # rounding: 1 pixel in 12,288 was off
        png = base64.b64decode(image["png"])
        req = inference_request(TASKS["itm"], {"image": png, "text": "a red circle"}, vocab, pcfg)
        enc = model.encode(torch.tensor([req.source]), req.image[None], torch.ones(1, dtype=torch.bool))
        [[s_yes, s_no]] = score_candidates(model, enc, [[yes, no]], ids=SpecialIds.of(vocab),
                                           restrict_to_candidates=True)
        assert image["itm_score"] == pytest.approx(1 / (1 + np.exp(s_no - s_yes)), abs=1e-5)
        assert image["logprob"] < 0
    scores = [im["itm_score"] for im in res["images"]]
    assert scores == sorted(scores, reverse=True)
    [itm] = predictor.predict("itm", [{"image": base64.b64decode(res["images"][0]["png"]), "text": "a red circle"}])
    assert itm["scores"]["yes"] == pytest.approx(scores[0], abs=1e-5)


def test_a_model_without_a_tokenizer_and_the_limits_refuse_before_any_work(plain, bundle):
    refused = OFAPredictor.from_bundle(plain).predict("text_to_image", [{"text": "a red circle"}])
    assert reasons(refused) == ["no_image_tokenizer"]
    assert "image_tokenizer=" in refused[0]["error"]["message"]
    b = load_bundle(bundle)
    limited = OFAPredictor(b.model, b.vocab, b.preprocess, image_tokenizer=b.image_tokenizer,
                           limits=PredictorLimits(max_samples=4, max_sample_codes=3 * GRID, max_images=2))
    out = limited.predict("text_to_image", [{"text": "a", "num_samples": 5}, {"text": "a", "num_samples": 4},
                                            {"text": "a", "num_samples": 3},
                                            {"text": "a", "decoding": {"sampling": False, "beam_size": 4}}])
    assert reasons(out) == ["limit_exceeded"] * 4
    assert [o["error"]["message"] for o in out[:2]] == ["num_samples=5 is over the limit of 4",
                                                        "4 samples x 64 codes is over the limit of 192 codes"]
    assert "3 more images would make 3 in this call, over the limit of 2" in out[2]["error"]["message"]
    beams = limited.predict("text_to_image", [{"text": "a", "decoding": {"sampling": False, "beam_size": 3}}])
    assert "3 more images would make 3 in this call" in beams[0]["error"]["message"]  # 3 beams decode 3 images
    # a caption whose ranking question cannot be asked (ITM's normalisation empties "!!!") fails alone, before any
    # decoding; its neighbours get their images
    mixed = limited.predict("text_to_image", [{"text": "!!!", "num_samples": 1},
                                              {"text": "a red circle", "num_samples": 1, "seed": 0}])
    assert reasons(mixed) == ["empty_text", None]
    assert len(mixed[1]["images"]) == 1 and mixed[1]["images"][0]["rank"] == 1


def test_serve_packs_requests_by_images_so_none_is_refused_for_its_neighbours(bundle):
    """Requests that Serve batches together share one predictor call only while their images fit max_images:
    three requests of 2 samples under a limit of 4 images are answered in two calls, none refused."""
    from serve_app.model import Call, run_calls

    b = load_bundle(bundle)
    limited = OFAPredictor(b.model, b.vocab, b.preprocess, image_tokenizer=b.image_tokenizer,
                           limits=PredictorLimits(max_images=4))
    item = {"text": "a red circle", "num_samples": 2, "seed": 1}
    assert limited.images_asked("text_to_image", [item, item, {"text": "a", "num_samples": 99}]) == 4
    assert limited.images_asked("caption", [item]) == 0
    answers, n_predict = run_calls(limited, [Call("text_to_image", [item])] * 3)
    assert n_predict == 2
    expected = limited.predict("text_to_image", [item])[0]
    for answer in answers:
        [result] = answer["results"]
        assert [im["png"] for im in result["images"]] == [im["png"] for im in expected["images"]]


# ---------------------------------------------------------------------------------------------- command line


def test_the_command_line_writes_ranked_pngs(bundle, plain, tmp_path, capsys):
    from jobs.generate_images import main

    main(["--model", str(bundle), "--text", "a red circle", "--num-samples", "2", "--seed", "3",
          "--output", str(tmp_path / "out")])
    listing = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [im["file"] for im in listing["images"]] == ["rank01.png", "rank02.png"]
    for im in listing["images"]:
        assert Image.open(tmp_path / "out" / im["file"]).size == (64, 64)
    assert json.loads(capsys.readouterr().out)["files"][0].endswith("rank01.png")
    for argv, words in ((["--model", str(bundle), "--text", " "], "is empty"),
                        (["--model", str(plain), "--text", "a cat"], "carries no image tokenizer"),
                        (["--model", str(bundle), "--text", "a cat", "--num-samples", "100"], "num_samples")):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--output", str(tmp_path / "bad")])
        assert exit_.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # a second run with fewer images leaves no stale rank file; codes on request; beam search through --decoding
    main(["--model", str(bundle), "--text", "a red circle", "--decoding", '{"beam_size": 1}', "--return-codes",
          "--output", str(tmp_path / "out")])
    listing = json.loads((tmp_path / "out" / "images.json").read_text())
    assert sorted(p.name for p in (tmp_path / "out").glob("rank*.png")) == ["rank01.png"]
    assert len(listing["images"]) == 1 and len(listing["images"][0]["codes"]) == 64
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    for argv, words in ((["--output", str(tmp_path / "file")], "is not a directory"),
                        (["--output", str(tmp_path / "file" / "sub")], "not a writable directory"),
                        (["--decoding", "{beam", "--output", str(tmp_path / "o2")], "--decoding is not JSON")):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(bundle), "--text", "a cat", *argv])
        assert exit_.value.code == 2 and words in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def app(ray_cluster, bundle, plain, tmp_path_factory):
    """A Serve application: "t2i" (with the tokenizer) serves text_to_image, "plain" has no tokenizer."""
    from ray import serve

    from pipelines.local.s3 import free_ports
    from serve_app.app import start
    from serve_app.serve_config import serve_config

    tmp = tmp_path_factory.mktemp("t2i-serve")
    [port] = free_ports(1)
    cfg = serve_config(data={
        "models": {"t2i": {"source": str(bundle), "tasks": ["text_to_image"]}, "plain": {"source": str(plain)}},
        "num_cpus": 0.1, "torch_threads": 1, "ingress": {"num_cpus": 0.05}, "model_cache": str(tmp / "cache"),
        "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "request_timeout_s": 300, "app_name": "t2i", "port": port,
        "limits": {"max_samples": 2, "max_text_chars": 200}})
    try:
        yield start(cfg)
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_the_endpoint_returns_ranked_pngs_and_refuses_bad_input(app, predictor):
    def post(body):
        return requests.post(f"{app}/v1/text-to-image", json=body, timeout=300)

    item = {"text": "a red circle", "num_samples": 2, "seed": 7}
    r = post({"items": [item, {"text": ""}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["task"]) == ("t2i", "text_to_image")
    [expected] = predictor.predict("text_to_image", [item])
    got, bad = body["results"]
    assert [pixels_of(im["png"]).shape for im in got["images"]] == [(64, 64, 3)] * 2
    same_images(got, expected)
    assert bad["error"]["reason"] == "empty_text"
    for what, body, status, reason in [
        ("empty caption", {"items": [{"text": " "}]}, 422, "empty_text"),
        ("over-long caption", {"items": [{"text": "a" * 201}]}, 422, "limit_exceeded"),
        ("too many samples", {"items": [{"text": "a cat", "num_samples": 3}]}, 422, "limit_exceeded"),
        ("samples as a string", {"items": [{"text": "a cat", "num_samples": "2"}]}, 422, "bad_type"),
        ("a number for the caption", {"items": [{"text": 5}]}, 422, "bad_type"),
        ("a field the route does not take", {"items": [{"text": "a", "image": "x"}]}, 422, "bad_type"),
        ("no items", {"items": []}, 422, "bad_type"),
        ("a model without a tokenizer", {"model": "plain", "items": [{"text": "a cat"}]}, 422, "no_image_tokenizer"),
    ]:
        r = post(body)
        assert (r.status_code, r.json()["error"]["reason"]) == (status, reason), (what, r.text[:300])


def test_image_infilling_answers_the_centre_as_an_image(predictor):
    from tests.test_predictor import png

    [out] = predictor.predict("image_infilling", [{"image": png((128, 128)), "seed": 0, "return_codes": True}])
    [image] = out["images"]
    assert (out["width"], out["height"], image["rank"]) == (64, 64, 1) and "itm_score" not in image  # no caption
    assert len(image["codes"]) == GRID and all(0 <= c < CODES for c in image["codes"])
    assert pixels_of(image["png"]).shape == (64, 64, 3)
