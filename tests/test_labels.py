"""The label table must equal cityscapesScripts' field by field, and the lookup tables agree."""

import numpy as np
import pytest
from cityscapesscripts.helpers import labels as cs

from fcn.cityscapes import labels


def test_table_equals_cityscapesscripts_field_by_field():
    assert len(labels.LABELS) == len(cs.labels) == 35
    for ours, theirs in zip(labels.LABELS, cs.labels):
        for field in labels.Label._fields:
            assert getattr(ours, field) == getattr(theirs, field), (ours.name, field)


def test_evaluated_classes_are_the_19_train_ids_in_order():
    assert [lab.trainId for lab in labels.EVAL_LABELS] == list(range(19))
    assert labels.CLASS_NAMES == tuple(cs.trainId2label[t].name for t in range(19))


@pytest.mark.parametrize("label", [lab for lab in labels.LABELS if lab.id >= 0], ids=lambda l: l.name)
def test_lookup_tables_match_cityscapesscripts(label):
    assert labels.ID_TO_TRAINID[label.id] == (label.trainId if label.trainId >= 0 else 255)
    assert tuple(labels.ID_TO_COLOR[label.id]) == cs.id2label[label.id].color


def test_trainid_roundtrip_and_colors():
    train_ids = np.arange(19)
    ids = labels.TRAINID_TO_ID[train_ids]
    assert np.array_equal(labels.ID_TO_TRAINID[ids], train_ids)
    for t in range(19):
        assert tuple(labels.TRAINID_TO_COLOR[t]) == cs.trainId2label[t].color
    assert labels.TRAINID_TO_ID[255] == 0  # ignore → 'unlabeled' in submissions
    assert tuple(labels.TRAINID_TO_COLOR[255]) == (0, 0, 0)


def test_ids_outside_the_table_map_to_ignore():
    assert labels.ID_TO_TRAINID[34] == labels.ID_TO_TRAINID[200] == 255


@pytest.mark.parametrize("name, expected", [
    ("car", "car"), ("cargroup", "car"), ("persongroup", "person"), ("polegroup", "polegroup"),
    ("roadgroup", "road"), ("nonsense", None), ("nonsensegroup", None),
])
def test_group_labels_resolve_like_cityscapesscripts(name, expected):
    resolved = labels.label_for_polygon(name)
    assert (resolved.name if resolved else None) == expected
