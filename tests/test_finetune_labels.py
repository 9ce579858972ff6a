"""Label table and multi-hot targets against the original's `dataloader.py` behaviour."""

import numpy as np
import pytest

from ssast_jax.finetune import labels

# The format of the original's `class_labels_indices.csv` files (quoted display names).
CSV = 'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n' \
      '2,/m/02zsn,"Female speech"\n3,/m/0ytgt,"Child speech"\n'


@pytest.fixture
def table(tmp_path):
  path = tmp_path / 'class_labels_indices.csv'
  path.write_text(CSV)
  return labels.load_label_table(path)


def test_table_in_index_order(table):
  assert table.num_labels == 4
  assert table.mids == ('/m/09x0r', '/m/05zppz', '/m/02zsn', '/m/0ytgt')
  assert table.display_names[1] == 'Male speech, man speaking'
  assert table.index('/m/02zsn') == 2 and '/m/0ytgt' in table and 'x' not in table


def test_multi_hot_values(table):
  target = labels.multi_hot('/m/0ytgt,/m/09x0r', table, wav='a.wav')
  assert target.dtype == np.float32
  np.testing.assert_array_equal(target, [1, 0, 0, 1])
  np.testing.assert_array_equal(labels.multi_hot('/m/02zsn', table, wav='a.wav'), [0, 0, 1, 0])
  # whitespace is stripped (the original would raise KeyError); a repeated mid stays 1.0
  np.testing.assert_array_equal(labels.multi_hot(' /m/02zsn, /m/02zsn', table, wav='a'),
                                [0, 0, 1, 0])
  assert labels.parse_labels('/m/0ytgt,/m/09x0r', table, wav='a') == [3, 0]


def test_multi_hot_batch(table):
  targets = labels.multi_hot_batch(['/m/09x0r', '/m/05zppz,/m/02zsn'], ['a', 'b'], table)
  np.testing.assert_array_equal(targets, [[1, 0, 0, 0], [0, 1, 1, 0]])
  assert targets.dtype == np.float32


def test_unknown_mid_names_the_clip(table):
  with pytest.raises(labels.LabelError) as e:
    labels.multi_hot('/m/09x0r,/m/nope', table, wav='audio/clip_17.wav')
  assert str(e.value) == ("clip 'audio/clip_17.wav': label '/m/nope' is not a mid of the "
                          "label CSV (4 classes)")
  assert isinstance(e.value, ValueError)


@pytest.mark.parametrize('field', ['', '   '])
def test_empty_labels_name_the_clip(table, field):
  with pytest.raises(labels.LabelError, match=r"^clip 'x/y\.wav' has no labels; every clip "
                     r"of a labelled fine-tuning task needs at least one mid"):
    labels.multi_hot(field, table, wav='x/y.wav')


@pytest.mark.parametrize('field', ['/m/09x0r,,/m/02zsn', '/m/09x0r,'])
def test_empty_item_names_the_clip(table, field):
  with pytest.raises(labels.LabelError) as e:
    labels.multi_hot(field, table, wav='c.wav')
  assert str(e.value) == f"clip 'c.wav': labels {field!r} contain an empty item"


def test_batch_error_names_first_bad_clip_and_count(table):
  with pytest.raises(labels.LabelError) as e:
    labels.multi_hot_batch(['/m/09x0r', 'bad', '', '/m/02zsn'], ['a', 'b', 'c', 'd'], table)
  assert str(e.value) == ("clip 'b': label 'bad' is not a mid of the label CSV (4 classes) "
                          "(and 1 more clips with bad labels)")
  with pytest.raises(ValueError, match='2 label fields for 1 wav ids'):
    labels.multi_hot_batch(['a', 'b'], ['a'], table)


def test_bad_csv_is_a_label_error(tmp_path):
  with pytest.raises(labels.LabelError, match='does not exist|not readable'):
    labels.load_label_table(tmp_path / 'missing.csv')
  bad = tmp_path / 'bad.csv'
  bad.write_text('index,mid,display_name\n0,/m/a,"A"\n2,/m/b,"B"\n')
  with pytest.raises(labels.LabelError, match='indices must be 0..1'):
    labels.load_label_table(bad)
  bad.write_text('index,mid,display_name\n0,/m/a,"A"\n1,/m/a,"B"\n')
  with pytest.raises(labels.LabelError, match='a mid appears twice'):
    labels.load_label_table(bad)


def test_table_checks_itself():
  with pytest.raises(labels.LabelError):
    labels.LabelTable(('a', 'a'), ('A', 'B'))
  with pytest.raises(labels.LabelError):
    labels.LabelTable((), ())
