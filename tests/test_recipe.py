"""The training recipe: timm transforms (aspect kept, channels converted, flip switch), teachers
noised by default, pretrained weights from a file or a store model, their normalisation
recorded and used by `nsd label`."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import json_out, new_store, nsd
from nsd.engine.label import label
from nsd.engine.models import create_model, get_model_record, load_model, read_state_dict, save_weights
from nsd.engine.train import NOISE_DEFAULTS, TrainConfig, build_model, resolve_run
from nsd.engine.transforms import decode, eval_batch, eval_transform, train_transform

FAST = ["--model", "test_resnet", "--batch-size", "16", "--workers", "0", "--no-progress", "--hflip", "0",
        "--steps", "3", "--eval-split", ""]


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 4 classes, 16x16 grey
    return new_store(tmp_path_factory.mktemp("recipe") / "store", {"labeled": 8, "test": 2, "unlabeled": 4})


# --------------------------------------------------------------------------- transforms


def test_eval_keeps_the_aspect_ratio():
    """A wide image is scaled by its short side and centre-cropped, never squashed."""
    wide = np.zeros((16, 48), dtype=np.uint8)
    wide[:, 16:32] = 255  # a white middle third
    x = eval_transform(16, (0.0,), (1.0,))(decode(encoded(Image.fromarray(wide)), 1))
    assert x.shape == (1, 16, 16)
    assert x.min() > 0.99  # the centre crop is the white square; squashing would bring in black
    got = eval_batch([encoded(Image.fromarray(wide))], 16, 1, (0.0,), (1.0,))
    assert torch.equal(got[0], x)  # the batched eval path does the same


def test_large_images_follow_the_imagenet_eval_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 100, 3), dtype=np.uint8))
    steps = [type(t).__name__ for t in eval_transform(96, (0.5,) * 3, (0.5,) * 3).transforms]
    assert steps[:2] == ["Resize", "CenterCrop"]
    assert eval_transform(96, (0.5,) * 3, (0.5,) * 3).transforms[0].size == 109  # 96 / 0.875
    assert eval_transform(96, (0.5,) * 3, (0.5,) * 3)(img).shape == (3, 96, 96)
    tf = train_transform(96, (0.5,) * 3, (0.5,) * 3, 2, 9, 3, random_erasing=0.25)
    names = [type(t).__name__ for t in tf.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names and "RandomErasing" in names
    assert tf(img).shape == (3, 96, 96)


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "P", "LA", "I;16", "1"])
def test_every_mode_becomes_the_models_channels(mode):
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    if mode == "I;16":
        grey16 = (np.asarray(base.convert("L")).astype(np.uint16) << 8) | 0x7F
        img = Image.fromarray(grey16)
        assert img.mode == "I;16"
    else:
        img = base.convert(mode)
    data = encoded(img, "TIFF" if mode == "CMYK" else "PNG")
    for chans in (1, 3):
        x = np.asarray(decode(data, chans))
        assert x.shape == ((8, 8) if chans == 1 else (8, 8, 3)) and x.dtype == np.uint8
    if mode == "I;16":  # 16-bit grey is scaled to 8 bits (it used to come out nearly all white)
        assert np.array_equal(np.asarray(decode(data, 1)), np.asarray(base.convert("L")))
    if mode == "RGBA":
        assert np.array_equal(np.asarray(decode(data, 3)), rgb)


def test_flip_switch():
    img = np.zeros((16, 16), dtype=np.uint8)
    img[:, :4] = 255  # a bright left edge
    pil = Image.fromarray(img)

    def left_is_bright(hflip):
        tf = train_transform(16, (0.0,), (1.0,), 0, 9, 1, hflip=hflip)
        torch.manual_seed(0)
        return [bool(tf(pil)[0, :, :2].mean() > 0.5) for _ in range(40)]

    assert all(left_is_bright(0.0))  # never flipped (padding shifts it by 2 px at most)
    assert not any(left_is_bright(1.0))  # always flipped
    assert 5 < sum(left_is_bright(0.5)) < 35


# --------------------------------------------------------------------------- noise and weights


def test_teacher_trains_with_noise_by_default(store):
    res = nsd(store, "train", *FAST, "--name", "noisy-teacher", "--json")
    assert res.exit_code == 0, res.output
    rec = json_out(res)
    assert rec["selection"] is None and rec["noise"] == {**NOISE_DEFAULTS, "hflip": 0.0}
    assert rec["init"] is None and rec["mean"] == [0.5] and rec["std"] == [0.5]
    res = nsd(store, "train", *FAST, "--name", "plain-teacher", "--no-noise", "--json")
    rec = json_out(res)
    assert rec["noise"]["randaug_n"] == 0 and rec["noise"]["drop_rate"] == 0 and rec["noise"]["random_erasing"] == 0


def test_pretrained_file_gets_a_new_head_and_its_normalisation(store, tmp_path):
    # An RGB resnet10t with 7 classes, as from ImageNet-like data (its pretrained config's
    # normalisation is ImageNet's).
    donor = create_model("resnet10t", 7, 3)
    path = str(tmp_path / "donor.safetensors")
    save_weights(donor, path)
    # What the run starts from: the donor's body, the stem summed to one channel, a fresh 4-way head.
    cfg = TrainConfig(name="x", arch="resnet10t", pretrained_file=path)
    resolved = resolve_run(store, cfg)
    model = build_model(store, cfg, resolved, fresh=True)
    donor_state, own = donor.state_dict(), model.state_dict()
    assert torch.equal(own["layer1.0.conv1.weight"], donor_state["layer1.0.conv1.weight"])
    assert torch.allclose(own["conv1.0.weight"], donor_state["conv1.0.weight"].sum(1, keepdim=True))
    assert own["fc.weight"].shape == (4, donor_state["fc.weight"].shape[1])
    assert resolved.init["head_replaced"] and resolved.init["pretrained_file"] == path
    imagenet_grey = (pytest.approx(sum((0.485, 0.456, 0.406)) / 3), pytest.approx(sum((0.229, 0.224, 0.225)) / 3))
    assert (resolved.mean[0], resolved.std[0]) == imagenet_grey

    # Through the CLI: recorded in `models`, and labeling normalises with it.
    res = nsd(store, "train", *FAST, "--model", "resnet10t", "--name", "from-file", "--pretrained-file", path)
    assert res.exit_code == 0, res.output
    rec = get_model_record(store, "from-file")
    assert rec["init"]["sha256"] and rec["init"]["head_replaced"] is True
    assert rec["mean"][0] == pytest.approx(0.4490, abs=1e-4) and rec["std"][0] == pytest.approx(0.2260, abs=1e-4)
    out = label(store, "from-file", shard_size=64, progress=False)
    net, info = load_model(store, "from-file")
    with store.reader() as con:
        got = con.execute("SELECT p.probs, i.bytes FROM pseudo_labels p JOIN images i USING (image_id) "
                          "WHERE label_run = ? ORDER BY image_id", [out["run_id"]]).fetchall()
    tf = eval_transform(16, tuple(rec["mean"]), tuple(rec["std"]))
    with torch.no_grad():
        ref = torch.softmax(net(torch.stack([tf(decode(b, 1)) for _, b in got])), 1).numpy()
        half = torch.softmax(net(torch.stack([eval_transform(16, (0.5,), (0.5,))(decode(b, 1)) for _, b in got])),
                             1).numpy()
    np.testing.assert_allclose(np.array([p for p, _ in got]), ref, atol=1e-5)
    assert np.abs(ref - half).max() > 1e-4  # the normalisation made a difference the check can see


def test_pretrained_file_errors_are_one_line(store, tmp_path):
    other = str(tmp_path / "resnet18.pt")
    torch.save(create_model("resnet18", 4, 1).state_dict(), other)  # a weights-only state dict
    res = nsd(store, "train", *FAST, "--name", "wrong-arch", "--pretrained-file", other)
    assert res.exit_code == 2 and "do not fit" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = nsd(store, "train", *FAST, "--name", "missing", "--pretrained-file", str(tmp_path / "nope.safetensors"))
    assert res.exit_code == 2 and "not found" in res.stderr
    res = nsd(store, "train", *FAST, "--name", "two", "--pretrained-file", other, "--init-from", "noisy-teacher")
    assert res.exit_code == 2 and "one of" in res.stderr
    assert len(read_state_dict(other)) > 0  # the file itself was fine: it is the architecture that differs
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    for bad in (fifo, tmp_path / "zero.pt", tmp_path):  # never opened: a FIFO would hang, a device never end
        res = nsd(store, "train", *FAST, "--name", "bad-file", "--pretrained-file", str(bad))
        assert res.exit_code == 2 and "not a regular file" in res.stderr, res.output
    res = nsd(store, "train", *FAST, "--name", "big", "--pretrained-file", other, env={"NSD_MAX_WEIGHTS_BYTES": "1000"})
    assert res.exit_code == 2 and "larger than 1,000 bytes" in res.stderr


def test_pretrained_from_an_unreachable_hub_is_one_line(store):
    res = nsd(store, "train", *FAST, "--name", "hub", "--pretrained")  # the tests run with HF_HUB_OFFLINE=1
    assert res.exit_code == 2 and "cannot download pretrained weights for test_resnet" in res.stderr
    assert "--pretrained-file" in res.stderr and "Traceback" not in res.output


def test_init_from_a_store_model(store):
    res = nsd(store, "train", *FAST, "--name", "warm", "--init-from", "noisy-teacher", "--steps", "1",
              "--lr", "1e-9", "--no-noise")
    assert res.exit_code == 0, res.output
    rec, src = get_model_record(store, "warm"), get_model_record(store, "noisy-teacher")
    assert rec["init"] == {"model": "noisy-teacher", "sha256": src["sha256"], "head_replaced": False}
    a, b = read_state_dict(rec["checkpoint"]), read_state_dict(src["checkpoint"])
    # One step at lr 1e-9 (and batch-norm statistics of one batch) away from the teacher's weights.
    assert torch.allclose(a["layer1.0.conv1.weight"], b["layer1.0.conv1.weight"], atol=1e-6)
    res = nsd(store, "train", *FAST, "--name", "warm2", "--init-from", "nobody")
    assert res.exit_code == 2 and "unknown model" in res.stderr


def test_a_store_made_before_models_init_gets_the_column_in_the_writing_commit(tmp_path):
    s = new_store(tmp_path / "old", {"labeled": 4, "test": 1})
    s.write("downgrade", {}, lambda con: con.execute("ALTER TABLE models DROP COLUMN init") and {})
    before = s.latest_snapshot()
    res = nsd(s, "train", *FAST, "--name", "m")
    assert res.exit_code == 0, res.output
    assert s.latest_snapshot() == before + 1  # the column came with the model's own snapshot
    assert get_model_record(s, "m")["init"] is None
