"""Detection sites on real BCCD slides: VOC, COCO and CSV layouts, box checks, tiling."""

from __future__ import annotations

import csv
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from medmeta_common.config import DataConfig, ImageConfig, PartitionConfig
from medmeta_common.data.detection import (
    DetectionData,
    box_targets,
    image_rows,
    tile_windows,
    to_source_coords,
)
from medmeta_common.data.images import read_image_file
from medmeta_common.data.sources import load_detection
from medmeta_common.data.transforms import harmonise_stack
from medmeta_common.errors import DataError
from tests.conftest import shared_file

IMAGE = ImageConfig(size=64, channels=3)
SMALL = ImageConfig(size=16, channels=3)
FEW = ("BloodImage_00000", "BloodImage_00001", "BloodImage_00002")
BAD = ("BloodImage_00338", "BloodImage_00343")


@pytest.fixture
def bccd() -> Path:
    return shared_file("bccd/BCCD")


def xml_boxes(voc: Path, stem: str) -> tuple[np.ndarray, list[str]]:
    """The boxes and names an XML annotation holds, read independently of medmeta."""
    root = ET.parse(voc / "Annotations" / f"{stem}.xml").getroot()
    boxes, names = [], []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        assert box is not None
        boxes.append([float(box.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")])
        names.append(obj.findtext("name") or "")
    return np.array(boxes).reshape(-1, 4), names


def voc_copy(voc: Path, folder: Path, stems: tuple[str, ...]) -> Path:
    """A small VOC folder holding real BCCD slides ``stems`` (and no ImageSets)."""
    (folder / "Annotations").mkdir(parents=True)
    (folder / "JPEGImages").mkdir()
    for stem in stems:
        shutil.copy(voc / "Annotations" / f"{stem}.xml", folder / "Annotations")
        shutil.copy(voc / "JPEGImages" / f"{stem}.jpg", folder / "JPEGImages")
    return folder


def source_boxes(data: DetectionData, row: int) -> tuple[np.ndarray, list[str]]:
    """A row's boxes mapped back to its source image, with their class names."""
    boxes, labels = data.boxes_of(row)
    return to_source_coords(data, row, boxes), [data.classes[i] for i in labels]


def sorted_boxes(boxes: np.ndarray, names: list[str]) -> list[tuple[str, tuple[float, ...]]]:
    return sorted((n, tuple(np.round(b, 3).tolist())) for b, n in zip(boxes, names, strict=True))


# --- Pascal VOC --------------------------------------------------------------------


def test_voc_split_reads_its_list_and_boxes_map_back_to_the_xml(bccd: Path) -> None:
    data = load_detection(DataConfig(path=str(bccd), split="test"), IMAGE)
    listed = (bccd / "ImageSets/Main/test.txt").read_text().split()
    assert len(listed) == 72 and not set(listed) & set(BAD)
    assert sorted(data.refs) == sorted(f"{s}.jpg" for s in listed)
    assert data.images.shape == (72, 3, 64, 64) and data.images.dtype == np.float32
    assert data.classes == ("Platelets", "RBC", "WBC") and not data.issues
    assert list(data.sources) == list(data.refs) == list(data.groups)
    assert not data.groups_known
    assert np.all(np.diff(data.box_rows) >= 0)
    for row, ref in enumerate(data.refs):
        expected, names = xml_boxes(bccd, Path(ref).stem)
        found, found_names = source_boxes(data, row)
        assert found_names == names
        np.testing.assert_allclose(found, expected, atol=1.0)
        # 640x480 -> 64x48, centred with 8 rows of padding above: y_row = y / 10 + 8.
        rows, _ = data.boxes_of(row)
        np.testing.assert_allclose(rows[:, 1], expected[:, 1] / 10 + 8, atol=1e-4)
    assert (data.boxes[:, 1] >= 8).all() and (data.boxes[:, 3] <= 56).all()


def test_zero_size_boxes_skip_their_image_with_a_report(bccd: Path, tmp_path: Path) -> None:
    data = load_detection(DataConfig(path=str(bccd), split="val"), SMALL)
    assert len(data) == 87 - 1 and "BloodImage_00338.jpg" not in data.refs
    assert [(i.file, i.reason) for i in data.issues] == [(
        "Annotations/BloodImage_00338.xml object 13",
        "zero-size box (x_min=x_max=504, y_min=y_max=337); image BloodImage_00338.jpg skipped")]

    folder = voc_copy(bccd, tmp_path / "voc", (*BAD, FEW[0]))
    data = load_detection(DataConfig(path=str(folder), split=None), SMALL)
    assert data.refs == ("BloodImage_00000.jpg",)
    assert [i.file for i in data.issues] == ["Annotations/BloodImage_00338.xml object 13",
                                             "Annotations/BloodImage_00343.xml object 4"]
    with pytest.raises(DataError) as error:
        load_detection(DataConfig(path=str(folder), split=None, policy="strict"), SMALL)
    assert error.value.file == "Annotations/BloodImage_00338.xml object 13"
    assert "zero-size box" in error.value.reason


def test_unreadable_xml_is_a_bad_file(bccd: Path, tmp_path: Path) -> None:
    folder = voc_copy(bccd, tmp_path / "voc", FEW[:2])
    xml = folder / "Annotations" / f"{FEW[1]}.xml"
    xml.write_text(xml.read_text()[:200])  # truncated
    data = load_detection(DataConfig(path=str(folder), split=None), SMALL)
    assert data.refs == (f"{FEW[0]}.jpg",)
    assert data.issues[0].file == f"Annotations/{FEW[1]}.xml"
    assert "unreadable annotation XML" in data.issues[0].reason


def test_classes_select_and_order_and_drop_other_boxes(bccd: Path, tmp_path: Path) -> None:
    folder = voc_copy(bccd, tmp_path / "voc", FEW)
    data = load_detection(DataConfig(path=str(folder), split=None, classes=("WBC", "RBC")),
                          SMALL)
    assert data.classes == ("WBC", "RBC")
    for row, ref in enumerate(data.refs):
        expected, names = xml_boxes(bccd, Path(ref).stem)
        keep = [n != "Platelets" for n in names]
        found, found_names = source_boxes(data, row)
        assert found_names == [n for n, k in zip(names, keep, strict=True) if k]
        np.testing.assert_allclose(found, expected[keep], atol=1e-3)
    with pytest.raises(DataError, match="not found"):
        load_detection(DataConfig(path=str(folder), split=None, classes=("Neutrophil",)), SMALL)


def test_per_image_split_and_partition_without_imagesets(bccd: Path, tmp_path: Path) -> None:
    stems = tuple(f"BloodImage_{i:05d}" for i in range(12))
    stems = tuple(s for s in stems if (bccd / "Annotations" / f"{s}.xml").is_file())
    folder = voc_copy(bccd, tmp_path / "voc", stems)
    parts = {s: load_detection(DataConfig(path=str(folder), split=s), SMALL).refs
             for s in ("train", "val", "test")}
    assert sorted(sum(parts.values(), ())) == sorted(f"{s}.jpg" for s in stems)
    halves = [load_detection(DataConfig(path=str(folder), split=None,
                                        partition=PartitionConfig(2, i)), SMALL).refs
              for i in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and len(halves[0]) + len(halves[1]) == len(stems)


def test_empty_and_builtin_sources_are_refused(bccd: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="built-in demo has no detection data"):
        load_detection(DataConfig(path="builtin:demo/site-0"), SMALL)
    folder = voc_copy(bccd, tmp_path / "voc", FEW[:1])
    (folder / "ImageSets/Main").mkdir(parents=True)
    (folder / "ImageSets/Main/test.txt").write_text("")
    with pytest.raises(DataError) as error:
        load_detection(DataConfig(path=str(folder), split="test"), SMALL)
    assert error.value.file == str(folder) and "no images in split 'test'" in error.value.reason


# --- tiling ------------------------------------------------------------------------


def test_tile_windows_cover_the_image_with_overlap() -> None:
    assert tile_windows(640, 480, 240) == [(x, y, 240, 240) for y in (0, 240)
                                           for x in (0, 200, 400)]
    assert tile_windows(640, 480, None) == [(0, 0, 640, 480)]
    assert tile_windows(640, 480, 480) == [(0, 0, 640, 480)]  # 640 <= 1.5 x 480
    assert tile_windows(1000, 200, 240) == [(x, 0, 240, 200) for x in (0, 190, 380, 570, 760)]


def test_tiles_keep_clipped_boxes_and_share_their_source(bccd: Path, tmp_path: Path) -> None:
    folder = voc_copy(bccd, tmp_path / "voc", FEW)
    data = load_detection(DataConfig(path=str(folder), split=None), IMAGE, tile=240)
    assert len(data) == 6 * len(FEW)
    crossing = 0
    for stem in FEW:
        rows = np.flatnonzero(data.sources == f"{stem}.jpg")
        assert len(rows) == 6 and len(set(data.groups[rows])) == 1
        assert {data.refs[r] for r in rows} == {f"{stem}.jpg#tile({x},{y})"
                                                for y in (0, 240) for x in (0, 200, 400)}
        expected, names = xml_boxes(bccd, stem)
        pixels = read_image_file(folder / "JPEGImages" / f"{stem}.jpg").frames[0]
        rows_again, origins = image_rows(pixels, IMAGE, tile=240)
        np.testing.assert_array_equal(rows_again, data.images[rows])
        np.testing.assert_array_equal(origins, data.origins[rows])
        for row in rows:
            x0, y0 = (int(v) for v in data.origins[row][:2])
            window = pixels[:, y0:y0 + 240, x0:x0 + 240][None]
            np.testing.assert_allclose(data.images[row], harmonise_stack(
                window, size=64, channels=3, intensity="zscore")[0], atol=1e-5)
            in_row, _ = data.boxes_of(row)
            assert ((in_row >= 0) & (in_row <= 64)).all()
            found, found_names = source_boxes(data, row)
            assert (found[:, :2] >= [x0 - 1e-3, y0 - 1e-3]).all()
            assert (found[:, 2:] <= [x0 + 240 + 1e-3, y0 + 240 + 1e-3]).all()
            # The oracle: each XML box clipped to the tile, kept if it holds >= half of it.
            clipped = np.clip(expected, [x0, y0, x0, y0], [x0 + 240, y0 + 240] * 2)
            area = np.prod(expected[:, 2:] - expected[:, :2], axis=1)
            part = np.prod(np.maximum(clipped[:, 2:] - clipped[:, :2], 0), axis=1)
            keep = part >= 0.5 * area
            assert sorted_boxes(found, found_names) == sorted_boxes(
                clipped[keep], [n for n, k in zip(names, keep, strict=True) if k])
            crossing += int((keep & (part < area)).sum())
    assert crossing > 0  # boxes cut by a tile edge do appear, clipped


def test_a_box_crossing_tile_edges_goes_to_the_tile_holding_half(bccd: Path,
                                                                 tmp_path: Path) -> None:
    """BloodImage_00000's WBC (260..491 x 177..376) is cut by x=240, x=440 and y=240.

    Tile (200, 240) holds 180/231 x 136/199 = 53% of it; tile (400, 240) 27%,
    tile (200, 0) 25%: it appears once, clipped.
    """
    folder = voc_copy(bccd, tmp_path / "voc", FEW[:1])
    data = load_detection(DataConfig(path=str(folder), split=None, classes=("WBC",)), IMAGE,
                          tile=240)
    holding = [(data.refs[r], source_boxes(data, r)[0].round(3).tolist())
               for r in range(len(data)) if len(data.boxes_of(r)[0])]
    assert holding == [("BloodImage_00000.jpg#tile(200,240)", [[260.0, 240.0, 440.0, 376.0]])]
    assert len(data) == 6  # tiles without boxes are kept


# --- CSV and COCO ------------------------------------------------------------------


def bccd_csv_rows(bccd: Path, stems: tuple[str, ...]) -> list[dict[str, str]]:
    """BCCD's own box list (filename,cell_type,xmin,xmax,ymin,ymax) for ``stems``."""
    with (bccd.parent / "bccd_boxes.csv").open(newline="") as handle:
        return [r for r in csv.DictReader(handle) if Path(r["filename"]).stem in stems]


def write_csv(folder: Path, rows: list[list[str]], header: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "boxes.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header or ["file", "x_min", "y_min", "x_max", "y_max", "label"])
        writer.writerows(rows)
    return folder


def csv_site(bccd: Path, folder: Path, stems: tuple[str, ...]) -> list[list[str]]:
    (folder / "slides").mkdir(parents=True)
    for stem in stems:
        shutil.copy(bccd / "JPEGImages" / f"{stem}.jpg", folder / "slides")
    return [[f"slides/{r['filename']}", r["xmin"], r["ymin"], r["xmax"], r["ymax"],
             r["cell_type"]] for r in bccd_csv_rows(bccd, stems)]


def same_boxes(a: DetectionData, b: DetectionData) -> None:
    assert a.classes == b.classes and len(a) == len(b)
    by_name = {Path(r).name: i for i, r in enumerate(b.refs)}
    for row, ref in enumerate(a.refs):
        other = by_name[Path(ref).name]
        assert sorted_boxes(*source_boxes(a, row)) == sorted_boxes(*source_boxes(b, other))
        np.testing.assert_array_equal(a.images[row], b.images[other])


def test_csv_and_coco_give_the_voc_boxes(bccd: Path, tmp_path: Path) -> None:
    voc = load_detection(DataConfig(path=str(voc_copy(bccd, tmp_path / "voc", FEW)),
                                    split=None), IMAGE)
    rows = csv_site(bccd, tmp_path / "csv", FEW)
    from_csv = load_detection(DataConfig(path=str(write_csv(tmp_path / "csv", rows)),
                                         split=None), IMAGE)
    same_boxes(from_csv, voc)
    assert from_csv.refs == tuple(f"slides/{s}.jpg" for s in FEW) and not from_csv.issues

    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    categories = [{"id": 8, "name": "RBC"}, {"id": 9, "name": "WBC"}]  # no Platelets here
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for number, stem in enumerate((*FEW, "BloodImage_00003"), 1):
        shutil.copy(bccd / "JPEGImages" / f"{stem}.jpg", coco / "images")
        images.append({"id": number, "file_name": f"{stem}.jpg", "width": 640, "height": 480})
        if stem in FEW:  # BloodImage_00003 is listed without annotations: all background
            boxes, names = xml_boxes(bccd, stem)
            for box, name in zip(boxes, names, strict=True):
                x, y, x1, y1 = box.tolist()
                annotations.append({"id": len(annotations) + 1, "image_id": number,
                                    "bbox": [x, y, x1 - x, y1 - y], "category_id": ids[name]})
    (coco / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    from_coco = load_detection(DataConfig(path=str(coco), split=None), IMAGE)
    assert from_coco.refs[-1] == "BloodImage_00003.jpg"
    assert len(from_coco.boxes_of(len(from_coco) - 1)[0]) == 0
    same_boxes(from_coco.subset(np.arange(3)), voc)
    direct = load_detection(DataConfig(path=str(coco / "instances.json"), split=None), IMAGE)
    np.testing.assert_array_equal(direct.boxes, from_coco.boxes)


def test_csv_bad_boxes_are_reported_by_line_and_skip_their_image(bccd: Path,
                                                                 tmp_path: Path) -> None:
    stems = (*FEW, "BloodImage_00003", "BloodImage_00004", "BloodImage_00005")
    rows = csv_site(bccd, tmp_path / "csv", stems)
    lines = {stem: [i + 2 for i, r in enumerate(rows) if stem in r[0]] for stem in stems}
    rows[lines[FEW[1]][3] - 2][3] = "700"  # x_max beyond the 640-pixel width
    rows[lines[FEW[2]][0] - 2][4] = "1"  # y_max above y_min
    rows[lines["BloodImage_00003"][2] - 2][1] = "abc"
    rows.append(["slides/BloodImage_00004.jpg", "10", "10", "10", "30", "RBC"])
    rows.append(["../outside.jpg", "1", "1", "5", "5", "RBC"])
    rows.append(["slides/BloodImage_00006.jpg", "", "", "", "", ""])  # listed, no boxes...
    shutil.copy(bccd / "JPEGImages/BloodImage_00006.jpg", tmp_path / "csv/slides")
    data = load_detection(DataConfig(path=str(write_csv(tmp_path / "csv", rows)), split=None),
                          IMAGE)
    n = len(rows) + 1  # the last row's line (the header is line 1)
    assert [i.file for i in data.issues] == [
        f"boxes.csv line {n - 1}", f"boxes.csv line {lines[FEW[1]][3]}",
        f"boxes.csv line {lines[FEW[2]][0]}", f"boxes.csv line {lines['BloodImage_00003'][2]}",
        f"boxes.csv line {n - 2}"]
    reasons = [i.reason for i in data.issues]
    assert reasons[0] == "file must be a path inside the site folder"
    assert reasons[1] == ("box (449, 400, 700, 480) outside the 640x480 image; image "
                          "slides/BloodImage_00001.jpg skipped")
    assert reasons[2].startswith("negative-size box (y_max=1 < y_min=")
    assert reasons[3].startswith("non-numeric box coordinates ['abc',")
    assert reasons[4] == ("zero-size box (x_min=x_max=10); image slides/BloodImage_00004.jpg "
                          "skipped")
    assert data.refs == ("slides/BloodImage_00000.jpg", "slides/BloodImage_00005.jpg",
                         "slides/BloodImage_00006.jpg")
    assert len(data.boxes_of(2)[0]) == 0  # the image listed without boxes is all background
    with pytest.raises(DataError) as error:
        load_detection(DataConfig(path=str(tmp_path / "csv"), split=None, policy="strict"),
                       IMAGE)
    assert error.value.file == f"boxes.csv line {n - 1}"  # the first bad row read


def test_csv_patients_and_split_column(bccd: Path, tmp_path: Path) -> None:
    rows = csv_site(bccd, tmp_path / "csv", FEW)
    patient = {FEW[0]: "P1", FEW[1]: "P1", FEW[2]: "P2"}
    split = {"P1": "train", "P2": "test"}
    rows = [[*r, patient[Path(r[0]).stem], split[patient[Path(r[0]).stem]]] for r in rows]
    folder = write_csv(tmp_path / "csv", rows, ["file", "x_min", "y_min", "x_max", "y_max",
                                                "label", "patient_id", "split"])
    train = load_detection(DataConfig(path=str(folder), split="train"), IMAGE)
    assert train.groups_known and list(train.groups) == ["P1", "P1"]
    assert list(train.sources) == [f"slides/{s}.jpg" for s in FEW[:2]]
    assert load_detection(DataConfig(path=str(folder), split="test"), IMAGE).refs == (
        f"slides/{FEW[2]}.jpg",)


def test_coco_bad_annotations_are_reported_by_id(bccd: Path, tmp_path: Path) -> None:
    coco = tmp_path / "coco"
    coco.mkdir()
    images = []
    for number, stem in enumerate((*FEW, "BloodImage_00003"), 1):
        shutil.copy(bccd / "JPEGImages" / f"{stem}.jpg", coco)
        images.append({"id": number, "file_name": f"{stem}.jpg", "width": 640, "height": 480})
    annotations = [
        {"id": 11, "image_id": 1, "bbox": [10, 10, 50, 50], "category_id": 1},
        {"id": 12, "image_id": 2, "bbox": [10, 10, 50, 50], "category_id": 5},
        {"id": 13, "image_id": 3, "bbox": [600, 10, 50, 50], "category_id": 1},
        {"id": 14, "image_id": 1, "bbox": [10, 10, "x", 50], "category_id": 1},
    ]
    (coco / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": 1, "name": "RBC"}]}))
    data = load_detection(DataConfig(path=str(coco), split=None), IMAGE)
    assert data.refs == ("BloodImage_00003.jpg",)  # listed without annotations: kept
    assert [i.file for i in data.issues] == ["annotations.json annotation 14",
                                             "annotations.json annotation 12",
                                             "annotations.json annotation 13"]
    assert data.issues[0].reason.startswith("bbox must be 4 numbers [x, y, w, h]; found [10,")
    assert data.issues[1].reason.startswith("unknown category_id 5 (the file declares [1])")
    assert data.issues[2].reason.startswith("box (600, 10, 650, 60) outside the 640x480 image")
    with pytest.raises(DataError) as error:
        load_detection(DataConfig(path=str(coco), split=None, policy="strict"), IMAGE)
    assert error.value.file == "annotations.json annotation 14"


# --- the container -----------------------------------------------------------------


def test_subset_renumbers_boxes_and_arrays_round_trip(bccd: Path, tmp_path: Path) -> None:
    folder = voc_copy(bccd, tmp_path / "voc", FEW)
    data = load_detection(DataConfig(path=str(folder), split=None), SMALL, tile=240)
    part = data.subset(np.array([7, 2, 7]))
    assert part.refs == (data.refs[7], data.refs[2], data.refs[7])
    assert np.all(np.diff(part.box_rows) >= 0)
    for new, old in enumerate((7, 2, 7)):
        for got, want in zip(part.boxes_of(new), data.boxes_of(old), strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(to_source_coords(part, new, part.boxes_of(new)[0]),
                                      to_source_coords(data, old, data.boxes_of(old)[0]))
    assert [len(b) for b, _ in box_targets(data, np.array([7, 2]))] == [
        len(data.boxes_of(7)[0]), len(data.boxes_of(2)[0])]

    arrays = data.to_arrays()
    assert all(a.dtype != object for a in arrays.values())
    np.savez(tmp_path / "cache.npz", **arrays)
    with np.load(tmp_path / "cache.npz", allow_pickle=False) as loaded:
        back = DetectionData.from_arrays(dict(loaded))
    for name in ("images", "boxes", "box_labels", "box_rows", "groups", "sources", "origins"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
    assert (back.refs, back.classes, back.issues, back.groups_known) == (
        data.refs, data.classes, data.issues, data.groups_known)
