"""Discovery, patient ids, grouped splits, decoding, caching and augmentation."""
import math
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from lib import cache
from lib import images
from lib import runs
from lib import transforms
from conftest import kaggle_names, shared, write_image


def test_discovery_handles_nested_copy_macosx_and_junk(tmp_path):
    root = tmp_path / "archive"
    first = write_image(root / "chest_xray" / "train" / "NORMAL" / "IM-0001-0001.jpeg", 1)
    write_image(root / "chest_xray" / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg", 2)
    nested = root / "chest_xray" / "chest_xray" / "train" / "NORMAL" / "IM-0001-0001.jpeg"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(first.read_bytes())
    write_image(root / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "._IM-0001-0001.jpeg", 3)
    (root / "chest_xray" / "train" / "NORMAL" / ".DS_Store").write_bytes(b"junk")
    found = data.find_images(str(root))
    assert sorted(os.path.basename(p) for p in found.paths) == ["IM-0001-0001.jpeg"] * 2 + ["person1_bacteria_1.jpeg"]
    assert not any("__MACOSX" in p for p in found.paths)
    assert any(p.endswith(".DS_Store") for p, _ in found.skipped)
    data.deduplicate(found, cache.ImageCache(None, 8))
    assert len(found.paths) == 2 and len(found.duplicates) == 1
    assert found.labels == [0, 1] and found.paths[0] == str(first)  # the shorter path is kept


def test_symlink_loop_terminates_and_extra_class_is_ignored(tmp_path):
    root = tmp_path / "a"
    write_image(root / "NORMAL" / "IM-0001-0001.png", 1)
    write_image(root / "PNEUMONIA" / "person1_virus_1.png", 2)
    write_image(root / "COVID" / "x.png", 3)
    os.symlink(root / "NORMAL", root / "NORMAL" / "loop")
    with pytest.warns(UserWarning, match="COVID"):
        found = data.find_images(str(root))
    assert len(found.paths) == 2 and found.labels == [0, 1]
    assert found.ignored_folders == [str(root / "COVID")]
    assert any("symlink loop" in why for _, why in found.skipped)


@pytest.mark.parametrize("name, patient", [
    ("person1430_bacteria_3695.jpeg", "person1430"), ("person12_virus_44.jpeg", "person12"),
    ("IM-0115-0001.jpeg", "IM-0115"), ("NORMAL2-IM-0022-0001.jpeg", "NORMAL2-IM-0022"),
    ("NORMAL2-IM-0173-0001-0002.jpeg", "NORMAL2-IM-0173"), ("scan.png", "file:/x/scan.png")])
def test_patient_id(name, patient):
    assert data.patient_id(f"/x/{name}") == patient


def test_patient_split_is_grouped_stratified_and_seeded():
    names = kaggle_names(60, per_patient=3)
    labels = np.array([data.CLASSES.index(lab) for lab, _ in names])
    patients = [data.patient_id(n) for _, n in names]
    split = data.split_groups(labels, patients, seed=3)
    where = {}
    for p, s in zip(patients, split):
        where.setdefault(p, set()).add(s)
    assert all(len(s) == 1 for s in where.values())
    for name, share in zip(data.SPLITS, (0.70, 0.15, 0.15)):
        for label in (0, 1):
            frac = np.mean(split[labels == label] == name)
            assert abs(frac - share) < 0.06, (name, label, frac)
    assert (data.split_groups(labels, patients, seed=3) == split).all()
    assert not (data.split_groups(labels, patients, seed=4) == split).all()


def test_too_few_patients_gives_counts():
    labels = np.array([0, 0, 1, 1, 1])
    with pytest.raises(data.DataError, match=r"too few patients .* 2 NORMAL and 3 PNEUMONIA"):
        data.split_groups(labels, ["a", "b", "c", "d", "e"])


def test_audit_counts_shared_patients_for_random_but_not_patient_split(tiny_archive):
    for mode, expect_leak in (("patient", False), ("random", True)):
        ds = data.load_dataset(str(tiny_archive), 32, mode, 0, None, workers=1, progress=False)
        report = data.audit(ds)
        assert report["duplicates_across_splits"] == 0
        assert (report["patients_in_several_splits"] > 0) == expect_leak, mode
        assert sum(s["images"] for s in report["splits"].values()) == 80


def test_official_split_tests_on_archive_test_folder(tmp_path):
    root = tmp_path / "archive"
    for i, (label, name) in enumerate(kaggle_names(20)):
        write_image(root / "chest_xray" / "train" / label / name, seed=i)
    for i, (label, name) in enumerate(kaggle_names(3)):
        write_image(root / "chest_xray" / "test" / label / name.replace("person", "person9").replace("IM-", "IM-9"),
                    seed=1000 + i)
    ds = data.load_dataset(str(root), 32, "official", 0, None, workers=1, progress=False)
    assert all(("/test/" in p) == (s == "test") for p, s in zip(ds.paths, ds.split))
    assert data.audit(ds)["patients_in_several_splits"] == 0


def _orientation(img: np.ndarray) -> float:
    """Angle in degrees of the principal axis of a bright shape (second moments)."""
    ys, xs = np.nonzero(img > 0.5)
    ys, xs = ys - ys.mean(), xs - xs.mean()
    return math.degrees(0.5 * math.atan2(2 * (xs * ys).mean(), (xs * xs).mean() - (ys * ys).mean()))


def test_training_augmentation_rotates_within_range_and_eval_is_centre_crop():
    side, size = 66, 60
    bar = torch.zeros(64, 1, side, side, dtype=torch.uint8)
    bar[:, :, 31:35, 8:58] = 255  # a horizontal bar
    prep = transforms.Preprocess(size, mean=0.0, std=1.0, augment=transforms.Augment.plain(15))
    out = prep.train(bar, torch.Generator().manual_seed(0))
    assert out.shape == (64, 1, size, size)
    angles = [_orientation(o[0].numpy()) for o in out]
    assert max(abs(a) for a in angles) <= 16.0
    assert max(abs(a) for a in angles) > 8.0  # it does rotate
    ev = prep.eval(bar)
    assert ev.shape == (64, 1, size, size) and torch.equal(ev, bar[..., 3:63, 3:63].float() / 255)
    plain = transforms.Preprocess(size, 0.0, 1.0, transforms.Augment.plain(0))
    still = plain.train(bar, torch.Generator().manual_seed(0))
    assert abs(_orientation(still[0, 0].numpy())) < 0.5


def _old_transform(batch, size, mean, std, max_rotation, generator):
    """The original project's training transform, as it was before the augmentation flags (the reference)."""
    n, side = batch.shape[0], batch.shape[-1]
    angle = torch.deg2rad((torch.rand(n, generator=generator) * 2 - 1) * max_rotation)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (side - size) / side
    scale = size / side
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, [n, 1, size, size], align_corners=False)
    x = torch.nn.functional.grid_sample(batch.float() / 255.0, grid, mode="bilinear", padding_mode="zeros",
                                        align_corners=False)
    return (x - mean) / std


def test_augment_none_equals_the_original_transform():
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 1, 44, 44), dtype=np.uint8))
    prep = transforms.Preprocess(40, 0.4, 0.2, transforms.Augment.plain(15))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(prep.train(batch, g1), _old_transform(batch, 40, 0.4, 0.2, 15, g2))
    assert torch.equal(g1.get_state(), g2.get_state())  # same draws: resume and seeds behave as before
    full = transforms.Preprocess(40, 0.4, 0.2).train(batch, torch.Generator().manual_seed(3))
    assert not torch.allclose(full, _old_transform(batch, 40, 0.4, 0.2, 15, torch.Generator().manual_seed(3)))


def _only(**kw) -> transforms.Augment:
    """An Augment with everything off except `kw`."""
    return transforms.Augment(**{**vars(transforms.Augment.plain(0)), **kw})


def test_gamma_keeps_black_and_white_and_bends_the_greys():
    row = torch.tensor([0, 64, 128, 192, 255], dtype=torch.uint8)
    batch = row.repeat(32, 1, 5, 1)  # 32 images of 5x5, same grey ramp in every row
    prep = transforms.Preprocess(5, mean=0.0, std=1.0, augment=_only(gamma=0.5))
    out = prep.train(batch, torch.Generator().manual_seed(0))[:, 0, 2]  # the middle row of each image
    assert torch.allclose(out[:, 0], torch.zeros(32), atol=1e-6) and torch.allclose(out[:, 4], torch.ones(32),
                                                                                    atol=1e-6)
    mid = out[:, 2]
    assert mid.min() < 128 / 255 - 0.05 and mid.max() > 128 / 255 + 0.05  # both darker and brighter greys
    assert bool(((out[:, 1:] - out[:, :-1]) > 0).all())  # monotone: the order of grey levels is kept


def _aspect(img: np.ndarray) -> float:
    """Width / height of the bright region."""
    ys, xs = np.nonzero(img > 0.5)
    return (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)


def test_zoom_jitter_changes_the_aspect_ratio_and_border_padding_paints_no_black_frame():
    side = 80
    batch = torch.zeros(64, 1, side, side, dtype=torch.uint8)
    batch[:, :, 30:50, 30:50] = 255  # a centred square: aspect 1
    prep = transforms.Preprocess(side, 0.0, 1.0, _only(zoom=0.25))
    ratios = [_aspect(o[0].numpy()) for o in prep.train(batch, torch.Generator().manual_seed(0))]
    assert min(ratios) < 0.9 and max(ratios) > 1.1  # wider and taller squares
    assert all(0.8 / 1.25 - 0.1 < r < 1.25 / 0.8 + 0.1 for r in ratios)
    plain = [_aspect(o[0].numpy()) for o in transforms.Preprocess(side, 0.0, 1.0, _only()).train(batch,
                                                                                                 torch.Generator())]
    assert all(abs(r - 1) < 0.06 for r in plain)
    grey = torch.full((16, 1, side, side), 200, dtype=torch.uint8)
    for padding, black in (("border", False), ("zeros", True)):
        out = transforms.Preprocess(side, 0.0, 1.0, _only(zoom=0.5, rotation=15, padding=padding)).train(
            grey, torch.Generator().manual_seed(1))
        assert bool((out < 0.1).any()) == black, padding


def test_contrast_brightness_and_noise_stay_in_range_and_vary_per_image():
    batch = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (32, 1, 24, 24), dtype=np.uint8))
    out = transforms.Preprocess(24, 0.0, 1.0, _only(contrast=0.3, brightness=0.1, noise=0.05)).train(
        batch, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    means = out.mean((1, 2, 3)) - batch.float().mean((1, 2, 3)) / 255
    assert means.std() > 0.02  # brightness differs between images


def test_per_image_standardisation_is_used_in_training_and_scoring_alike():
    batch = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (4, 1, 20, 20), dtype=np.uint8))
    prep = transforms.Preprocess(16, mean=0.9, std=9.0, augment=_only(), intensity="image")
    for x in (prep.eval(batch), prep.train(batch, torch.Generator())):
        assert torch.allclose(x.mean((1, 2, 3)), torch.zeros(4), atol=1e-5)
        assert torch.allclose(x.std((1, 2, 3)), torch.ones(4), atol=1e-4)
    darker = prep.eval((batch.float() * 0.5).to(torch.uint8))
    assert torch.allclose(darker, prep.eval(batch), atol=0.05)  # a global exposure change is undone


def test_preprocess_state_round_trips_and_reads_format_1_checkpoints():
    prep = transforms.Preprocess(64, 0.3, 0.2, _only(zoom=0.3, gamma=0.2, padding="reflection"), "image")
    assert transforms.Preprocess.from_state(prep.state()) == prep
    old = transforms.Preprocess.from_state({"image_size": 64, "mean": 0.3, "std": 0.2, "max_rotation": 10.0})
    assert old.augment == transforms.Augment.plain(10.0) and old.intensity == "dataset"
    # a checkpoint from before the experiments left: their training-only settings are dropped, and it scores alike
    before = {**prep.state(), "augment": {**prep.state()["augment"], "framing": 0.5, "layout_swap": 0.0}}
    assert transforms.Preprocess.from_state(before) == prep
    with pytest.raises(ValueError, match="left the product after commit 0b2105c"):
        transforms.Preprocess.from_state({**prep.state(), "intensity": "equalise"})


def test_normalisation_uses_given_statistics():
    batch = torch.full((2, 1, 10, 10), 128, dtype=torch.uint8)
    x = transforms.Preprocess(8, mean=0.5, std=0.25).eval(batch)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-6)
    mean, std, grey_range = transforms.fit_normalisation([np.full((3, 10, 10), 51, np.uint8)], 8)
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.0) and grey_range == pytest.approx((0.2, 0.2))


@pytest.mark.parametrize("sizes", [[50], [1, 49], [17, 3, 30], [10] * 5])
def test_normalisation_merged_over_chunks_equals_the_whole_split_at_once(sizes):
    rng = np.random.default_rng(1)
    # chunks of very different brightness: a wrong merge of their means or spreads shows at once
    chunks = [rng.integers(0, 80, (n, 12, 12), np.uint8) + np.uint8(30 * k) for k, n in enumerate(sizes)]
    whole = np.concatenate(chunks)
    crops = transforms.centre_crop(whole, 10).astype(np.float64) / 255.0
    mean, std, (low, high) = transforms.fit_normalisation(chunks, 10)
    assert mean == pytest.approx(crops.mean(), abs=1e-12) and std == pytest.approx(crops.std(), abs=1e-12)
    per_image = crops.reshape(len(crops), -1).mean(1)
    assert (low, high) == pytest.approx((per_image.min(), per_image.max()))


def test_a_ranks_share_of_a_batch_is_augmented_as_the_whole_batch_would_be():
    prep = transforms.Preprocess(24, 0.4, 0.2, transforms.Augment(noise=0.02, sharpness=0.3))
    batch = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (7, 1, 28, 28), np.uint8))
    whole = prep.train(batch, torch.Generator().manual_seed(5))
    for keep in (torch.tensor([0, 3, 6]), torch.tensor([1, 4]), torch.tensor([2, 5])):
        generator = torch.Generator().manual_seed(5)
        share = prep.train(batch[keep], generator, of=7, keep=keep)
        assert torch.allclose(share, whole[keep], atol=1e-5)
        assert torch.equal(generator.get_state(), _after_one_batch(prep, batch))  # every rank's generator stays equal


def _after_one_batch(prep, batch) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    prep.train(batch, generator)
    return generator.get_state()


def test_modes_convert_to_the_same_grey(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    reference = np.asarray(Image.fromarray(rgb).convert("L").resize((32, 32), Image.BILINEAR)).astype(int)
    for mode in ("RGB", "RGBA", "P", "CMYK"):
        img = Image.fromarray(rgb).convert(mode)
        path = tmp_path / f"x_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(path, quality=100) if mode == "CMYK" else img.save(path)
        tol = 12 if mode in ("P", "CMYK") else 1  # palette quantisation and CMYK JPEG are lossy
        assert np.abs(images.decode_image(str(path), 32).astype(int) - reference).mean() < tol, mode
    la = tmp_path / "x_LA.png"
    Image.fromarray(rgb).convert("LA").save(la)
    assert np.abs(images.decode_image(str(la), 32).astype(int) - reference).mean() <= 1


def test_16bit_png_keeps_contrast(tmp_path):
    grey = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    wide = (grey.astype(np.uint16) * 16)  # a 12-bit image stored in 16 bits
    path = tmp_path / "deep.png"
    Image.fromarray(wide).save(path)
    out = images.decode_image(str(path), 64)
    assert out.min() <= 1 and out.max() >= 254  # not clipped to white, not crushed to black
    assert np.abs(out.astype(int) - grey).mean() < 2


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 40), np.uint8)
    img[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "rot.jpg"
    Image.fromarray(img).save(path, exif=exif, quality=95)
    out = images.decode_image(str(path), 20)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # white ends up on top


def test_fast_decode_matches_full_decode_on_real_full_resolution_images():
    folder = shared("chest_xray_fullres_train")
    paths = sorted(str(p) for p in folder.rglob("*.jpeg"))[::6]
    diffs = [np.abs(images.decode_image(p, 176).astype(int) - images.decode_naive(p, 176).astype(int)).mean()
             for p in paths]
    assert len(paths) >= 15 and max(diffs) < 2.0, max(diffs)


def test_cache_second_load_decodes_nothing_and_rebuilds_only_changes(tiny_archive, tmp_path, monkeypatch):
    paths = sorted(str(p) for p in tiny_archive.rglob("*.jpeg"))
    cache_dir = tmp_path / "cache"
    first, _ = cache.load_images(paths, 24, cache.ImageCache(str(cache_dir), 24), workers=1, show=False)
    calls = []
    real = images.decode_with_colour  # what the cache decodes with
    monkeypatch.setattr(images, "decode_with_colour", lambda p, s: calls.append(p) or real(p, s))
    again, _ = cache.load_images(paths, 24, cache.ImageCache(str(cache_dir), 24), workers=1, show=False)
    assert calls == [] and np.array_equal(first, again)
    write_image(tiny_archive / "chest_xray" / "train" / "NORMAL" / "IM-0001-0001.jpeg", seed=999)
    cache.load_images(paths, 24, cache.ImageCache(str(cache_dir), 24), workers=1, show=False)
    assert [os.path.basename(p) for p in calls] == ["IM-0001-0001.jpeg"]
    assert not list(cache_dir.rglob(".tmp-*"))


def _load(paths, cache_dir):
    return cache.load_images(paths, 24, cache.ImageCache(str(cache_dir), 24), workers=1, show=False)


@pytest.mark.parametrize("damage", ["a flipped byte", "a truncated file", "a stale index"])
def test_damaged_cache_is_detected_and_only_the_bad_rows_decoded_again(tiny_archive, tmp_path, monkeypatch, damage):
    paths = sorted(str(p) for p in tiny_archive.rglob("*.jpeg"))
    mapped, _ = _load(paths, tmp_path / "c")
    assert cache._mapping(mapped) is not None  # the file's pages, not a copy in memory
    first = np.array(mapped)  # the damage below is written into the very pages `mapped` shows
    [array] = (tmp_path / "c").rglob("*.u8")
    raw = bytearray(array.read_bytes())
    if damage == "a flipped byte":
        raw[5 * 24 * 24 + 7] ^= 0xFF  # row 5
        array.write_bytes(bytes(raw))
    elif damage == "a truncated file":
        array.write_bytes(bytes(raw[:-100]))  # the last row is cut short
    else:
        index = json.loads(array.with_suffix(".json").read_text())
        index["crc"][2] += 1  # an index that does not describe the array: row 2 cannot be trusted
        array.with_suffix(".json").write_text(json.dumps(index))
    calls = []
    real = images.decode_with_colour  # what the cache decodes with
    monkeypatch.setattr(images, "decode_with_colour", lambda p, s: calls.append(p) or real(p, s))
    again, errors = _load(paths, tmp_path / "c")
    bad = {"a flipped byte": 5, "a truncated file": len(paths) - 1, "a stale index": 2}[damage]
    assert calls == [paths[bad]] and np.array_equal(first, again) and errors == [None] * len(paths)
    calls.clear()
    _load(paths, tmp_path / "c")
    assert calls == []  # rebuilt, so checked clean now


def test_a_cache_folder_that_cannot_be_written_costs_one_warning_not_the_run(tiny_archive, tmp_path, monkeypatch):
    paths = sorted(str(p) for p in tiny_archive.rglob("*.jpeg"))
    expected, _ = cache.load_images(paths, 24, cache.ImageCache(None, 24), workers=1, show=False)
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="cannot be written") as caught:
        unwritable, errors = _load(paths, tmp_path / "file" / "cache")  # a folder inside a file: never writable
    assert len(caught) == 1 and np.array_equal(unwritable, expected) and errors == [None] * len(paths)

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.warns(UserWarning, match="No space left on device") as caught:
        on_full_disk, _ = _load(paths, tmp_path / "full")
    assert len(caught) == 1 and np.array_equal(on_full_disk, expected)
    assert not [p for p in (tmp_path / "full").rglob("*") if p.suffix in (".u8", ".json") and "hashes" not in p.name]


def test_mapped_rows_read_only_what_is_asked_and_let_the_pages_go(tmp_path, monkeypatch):
    array = tmp_path / "a.u8"
    array.write_bytes(np.arange(40 * 16 * 16, dtype=np.uint8).tobytes())
    mapped = cache.map_array(array, 40, 16)
    rows = cache.ImageRows(mapped).take(np.arange(10, 30))
    assert rows.shape == (20, 16, 16) and np.array_equal(rows[[0, 5]], mapped[[10, 15]])
    assert np.array_equal(np.concatenate(list(rows.chunks(7))), mapped[10:30])
    released, real = [], rows.source.mapping

    class Watched:
        def madvise(self, *args):
            released.append(args)
            return real.madvise(*args)
    monkeypatch.setattr(cache, "RELEASE_BYTES", 16 * 16 * 4)
    rows.source.mapping = Watched()
    for i in range(20):
        assert np.array_equal(rows[i], mapped[10 + i])  # still readable after its pages were let go
    assert len(released) == 4  # every 5 rows read (over 4 rows' bytes), the pages are handed back


def test_parallel_decode_equals_serial(tiny_archive):
    paths = sorted(str(p) for p in tiny_archive.rglob("*.jpeg"))
    serial, _ = cache.load_images(paths, 24, cache.ImageCache(None, 24), workers=1, show=False)
    parallel, _ = cache.load_images(paths, 24, cache.ImageCache(None, 24), workers=2, show=False)
    assert np.array_equal(serial, parallel)


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def boom(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.atomic_write(target, boom)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_unreadable_file_is_reported_not_fatal_with_cache(tiny_archive, tmp_path):
    paths = sorted(str(p) for p in tiny_archive.rglob("*.jpeg"))[:3] + [str(tmp_path / "gone.jpeg")]
    decoded, errors = cache.load_images(paths, 16, cache.ImageCache(str(tmp_path / "c"), 16), workers=1, show=False)
    assert errors[:3] == [None] * 3 and "unreadable file" in errors[3] and not decoded[3].any()


def test_the_same_picture_in_two_formats_is_one_image_and_under_both_labels_none(tmp_path):
    root = tmp_path / "archive"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
    Image.fromarray(pixels).save(root / "NORMAL" / "IM-0001-0001.png")
    Image.fromarray(pixels).save(root / "NORMAL" / "IM-0001-0001.bmp")  # other bytes, same picture
    Image.fromarray(pixels).save(root / "PNEUMONIA" / "person1_virus_1.tiff")  # and under the other label
    other = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(other).save(root / "PNEUMONIA" / "person2_virus_1.png")
    Image.fromarray(255 - other).save(root / "NORMAL" / "IM-0002-0001.png")
    found = data.find_images(str(root))
    ds = data.decode_found(found, cache.ImageCache(None, 40), workers=1, progress=False)
    assert sorted(os.path.basename(p) for p in ds.paths) == ["IM-0002-0001.png", "person2_virus_1.png"]
    reasons = dict(found.skipped)
    for name in ("NORMAL/IM-0001-0001.png", "NORMAL/IM-0001-0001.bmp", "PNEUMONIA/person1_virus_1.tiff"):
        assert reasons[str(root / name)] == "the same image after decoding filed under both NORMAL and PNEUMONIA"
    assert not found.duplicates


@pytest.mark.parametrize("spread", [1.2, 2.0])
def test_near_copy_pairs_from_the_grid_are_exactly_the_brute_force_pairs(spread):
    rng = np.random.default_rng(1)  # 800 thumbnails in one tight cluster: thousands of pairs within 6 grey levels
    thumbs = (rng.normal(100, 30, (1, 64)) + rng.normal(0, 5, (800, 1)) + rng.normal(0, spread, (800, 64)))
    thumbs = thumbs.astype(np.float32)
    grid = {tuple(map(int, p)) for p in data._near_pairs(thumbs, data.NEAR_COPY_GREY)}
    every = np.abs(thumbs[:, None] - thumbs[None]).max(2) <= data.NEAR_COPY_GREY
    brute = {(int(i), int(j)) for i, j in zip(*np.nonzero(every)) if i < j}
    assert len(brute) > 1000 and grid == brute
    assert data._near_pairs(thumbs[:1], data.NEAR_COPY_GREY).shape == (0, 2)  # one image, or none: no pairs
