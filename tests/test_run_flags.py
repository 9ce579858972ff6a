"""`python -m ssast_jax.run`: the original run.py's flags, all of them mapped or refused; the
original's recipes and the users' run.sh give main.py the settings of our recipes.

No training: the plans are made in-process (or with --dry-run), and the printed main.py
command is parsed by main.py's own flag machinery and resolved without the data checks.
"""

import importlib
import os
import shlex
import string
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from ssast_jax import run
from ssast_jax.config import defaults, finetune, run_flags
from ssast_jax.config.finetune import resolve_finetune
from ssast_jax.config.run_flags import FLAGS, KEEP, SPECIAL, Ignored, Key, OffOnly, Refused
from ssast_jax.config.settings import ConfigError, resolve
from ssast_jax.model import MODEL_SIZES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every option string of YuanGongND/ssast src/run.py (HEAD a1a3eec), with its default
# (None where it has none); `--pretrain_stage` is commented out there.
ORIGINAL_FLAGS = {
    '--data-train': None, '--data-val': None, '--data-eval': None, '--label-csv': '',
    '--n_class': 527, '--dataset': None, '--dataset_mean': None, '--dataset_std': None,
    '--target_length': None, '--num_mel_bins': 128, '--exp-dir': '', '--lr': 0.001,
    '--learning-rate': 0.001, '--warmup': True, '--optim': 'adam', '-b': 12,
    '--batch-size': 12, '-w': 16, '--num-workers': 16, '--n-epochs': 1, '--lr_patience': 1,
    '--adaptschedule': False, '--n-print-steps': 100, '--save_model': None, '--freqm': 0,
    '--timem': 0, '--mixup': 0, '--bal': None, '--fstride': None, '--tstride': None,
    '--fshape': None, '--tshape': None, '--model_size': 'base384', '--task': 'ft_cls',
    '--mask_patch': 400, '--cluster_factor': 3, '--epoch_iter': 2000,
    '--pretrained_mdl_path': None, '--head_lr': 1, '--noise': None, '--metrics': 'mAP',
    '--lrscheduler_start': 10, '--lrscheduler_step': 5, '--lrscheduler_decay': 0.5,
    '--wa': None, '--wa_start': 16, '--wa_end': 30, '--loss': 'BCE'}
FORK_FLAGS = {'--data_dir', '--data_val_dir'}
# Flags whose original default is not copied: none there (the run fails without them), or
# machine-bound (-w); a left-out one keeps the config file's value.
KEEP_FLAGS = {'--data-train', '--data-val', '--data-eval', '--label-csv', '--dataset',
              '--dataset_mean', '--dataset_std', '--target_length', '--exp-dir',
              '--num-workers', '--save_model', '--fstride', '--tstride', '--fshape',
              '--tshape', '--model_size', '--pretrained_mdl_path', '--data_dir',
              '--data_val_dir'}

# A value for each flag, different from the original's default where it is mapped (ON:
# the flags pretraining takes at their off value only).
SAMPLES = {
    'data_train': 'tr.json', 'data_val': 'va.json', 'data_eval': 'ev.json',
    'label_csv': 'labels.csv', 'n_class': '527', 'dataset': 'audioset',
    'dataset_mean': '-5.5', 'dataset_std': '3.25', 'target_length': '512',
    'num_mel_bins': '64', 'exp_dir': 'exp2', 'lr': '0.0005', 'warmup': 'False',
    'optim': 'adam', 'batch_size': '7', 'num_workers': '3', 'n_epochs': '9',
    'lr_patience': '4', 'adaptschedule': 'True', 'n_print_steps': '11',
    'save_model': 'False', 'freqm': '0', 'timem': '0', 'mixup': '0', 'bal': 'none',
    'fstride': '12', 'tstride': '12', 'fshape': '32', 'tshape': '8', 'model_size': 'small',
    'task': 'pretrain_mpc', 'mask_patch': '300', 'cluster_factor': '4', 'epoch_iter': '500',
    'pretrained_mdl_path': 'm.pth', 'head_lr': '3', 'noise': 'False', 'metrics': 'acc',
    'lrscheduler_start': '2', 'lrscheduler_step': '3', 'lrscheduler_decay': '0.7',
    'wa': 'True', 'wa_start': '2', 'wa_end': '8', 'loss': 'CE', 'data_dir': 'pt',
    'data_val_dir': 'ptv'}
ON = {'freqm': '24', 'timem': '96', 'mixup': '0.5', 'bal': 'bal', 'noise': 'True'}
BASE = {'pretrain': ['--task', 'pretrain_joint', '--exp-dir', 'exp', '--data_dir', 'a',
                     '--data_val_dir', 'b'],
        'finetune': ['--task', 'ft_avgtok', '--exp-dir', 'exp', '--pretrained_mdl_path',
                     'base.pth', '--data_dir', 'a', '--data_val_dir', 'b']}


def _argv(script: str, **variables) -> list[str]:
  """The flags of a shell command line, its variables substituted."""
  text = string.Template(script.replace('\\\n', ' ')).substitute(variables)
  return shlex.split(text)


def _main_py_config(words: list[str]):
  """(config, workdir) as main.py's flags parse the printed command (`python` dropped)."""
  argv = words[1:]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string('workdir', None, '', flag_values=values)
  values(argv)
  return values.config, values.workdir


def _config(argv: list[str]):
  """The config main.py would run for a run.py command line."""
  run_plan, dry_run = run.plan(argv)
  assert not dry_run
  return _main_py_config(run.command(run_plan))[0]


def _flat(config, prefix=''):
  flat = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def _differences(config, recipe) -> dict:
  """{key: (ours, recipe's)} where the two configs differ."""
  ours, theirs = _flat(config), _flat(recipe)
  assert ours.keys() == theirs.keys()
  return {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}


def _recipe(name: str):
  return importlib.import_module(f'configs.{name}').get_config()


# --- the table against the original ------------------------------------------------------


def test_the_table_has_every_flag_of_the_original_and_the_forks():
  spellings = [name for flag in FLAGS for name in flag.names]
  assert len(spellings) == len(set(spellings))
  assert set(spellings) == set(ORIGINAL_FLAGS) | FORK_FLAGS
  for flag in FLAGS:
    for rule in (flag.pretrain, flag.finetune):
      assert rule == SPECIAL or isinstance(rule, (Key, Ignored, OffOnly, Refused)), flag


def test_left_out_flags_take_the_original_defaults():
  for flag in FLAGS:
    if flag.name in KEEP_FLAGS:
      assert flag.default is KEEP, flag.name
    else:
      assert flag.default == (ORIGINAL_FLAGS[flag.name] or False), flag.name
  assert {f.name for f in FLAGS if f.default is KEEP} == KEEP_FLAGS


def test_pretraining_sizes_are_the_models():
  assert set(run_flags.MODEL_SIZES) == set(MODEL_SIZES)


def test_mapped_keys_are_keys_of_the_configs():
  keys = {'pretrain': set(_flat(defaults.get_config())),
          'finetune': set(_flat(finetune.default_config()))}
  for flag in FLAGS:
    for task, rule in (('pretrain', flag.pretrain), ('finetune', flag.finetune)):
      if isinstance(rule, Key):
        assert set(rule.keys) <= keys[task], (flag.name, task)


def _outcome(argv):
  try:
    run_plan, _ = run.plan(argv)
  except run.RunError as error:
    return str(error)
  return run_plan


@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
@pytest.mark.parametrize('flag', [f for f in FLAGS if f.dest != 'task'], ids=lambda f: f.name)
def test_every_flag_is_mapped_accepted_or_refused_by_name_in_both_spellings(flag, task):
  rule = flag.pretrain if task == 'pretrain' else flag.finetune
  text = SAMPLES[flag.dest] if isinstance(rule, OffOnly) else ON.get(flag.dest, SAMPLES[flag.dest])
  base = _outcome(BASE[task])
  words = flag.name[2:]
  outcomes = [_outcome(BASE[task] + [spelling, text])
              for spelling in ('--' + words.replace('_', '-'), '--' + words.replace('-', '_'))]
  assert outcomes[0] == outcomes[1]
  outcome = outcomes[0]
  if isinstance(rule, Refused):
    assert outcome == f'{flag.name}: {rule.why}'
  elif isinstance(rule, Key):
    value = flag.parse(text)
    assert value != flag.default
    assert all(outcome.values[k] == rule.convert(value) for k in rule.keys)
  elif isinstance(rule, (Ignored, OffOnly)):
    if isinstance(rule, OffOnly):
      refusal = _outcome(BASE[task] + [flag.name, ON[flag.dest]])
      assert refusal.startswith(f'{flag.name} must be off')
    assert outcome.values == base.values
    assert all(note.startswith(f'{flag.name} {text} is unused') for note in outcome.notes)
  elif flag.dest == 'exp_dir':
    assert outcome.workdir == 'exp2'


def test_abbreviations_and_short_flags_are_the_originals():
  """`--pretrain False` (run_esc_frame.sh) abbreviates --pretrained_mdl_path, as argparse
  lets it in the original, and a later --pretrained_mdl_path wins; -b and -w."""
  run_plan, _ = run.plan(BASE['finetune'] + ['--pretrain', 'False', '--pretrained_mdl_path',
                                             'x.pth', '-b', '5', '-w', '2', '--learning_rate',
                                             '0.01'])
  assert (run_plan.values['pretrained'], run_plan.values['batch_size'],
          run_plan.values['data.workers'], run_plan.values['lr']) == ('x.pth', 5, 2, 0.01)


@pytest.mark.parametrize('text, expected', [('True', True), ('False', False), ('1', True),
                                            ('0', False), ('None', False)])
def test_literal_flags_are_tested_as_the_original_does(text, expected):
  run_plan, _ = run.plan(BASE['finetune'] + ['--wa', text, '--noise', text])
  assert run_plan.values['wa'] is expected and run_plan.values['noise'] is expected


@pytest.mark.parametrize('text, expected', [('bal', True), ('none', False), ('None', False)])
def test_bal_is_on_for_the_word_bal_only(text, expected):
  assert run.plan(BASE['finetune'] + ['--bal', text])[0].values['bal'] is expected


# --- pretraining: the original's scripts and the users' run.sh ---------------------------

# src/pretrain/run_mask_{patch,frame,patch_tiny}.sh, the run.py line.
PRETRAIN_SCRIPT = """--dataset ${dataset} \\
--data-train ${tr_data} --data-val ${te_data} --exp-dir $exp_dir \\
--label-csv ./data/class_labels_indices.csv \\
--lr $lr --n-epochs ${epoch} --batch-size $batch_size --save_model False \\
--freqm $freqm --timem $timem --mixup ${mixup} --bal ${bal} \\
--tstride $tstride --fstride $fstride --fshape ${fshape} --tshape ${tshape} \\
--dataset_mean ${dataset_mean} --dataset_std ${dataset_std} --target_length ${target_length} \\
--num_mel_bins ${num_mel_bins} \\
--model_size ${model_size} --mask_patch ${mask_patch} --n-print-steps 100 \\
--task ${task} --lr_patience ${lr_patience} --epoch_iter 4000"""
PRETRAIN_VARIABLES = dict(
    task='pretrain_joint', mask_patch=400, dataset='asli', tr_data='/d/audioset_librispeech.json',
    te_data='/d/eval_data.json', dataset_mean=-4.2677393, dataset_std=4.5689974,
    target_length=1024, num_mel_bins=128, model_size='base', fshape=16, tshape=16,
    fstride=16, tstride=16, bal='none', batch_size=24, lr='1e-4', lr_patience=2, epoch=10,
    freqm=0, timem=0, mixup=0, exp_dir='./exp/mask01')


@pytest.mark.parametrize('script, changes, config_file, mask_mode', [
    ('run_mask_patch.sh', {}, 'configs/pretrain_joint.py', 'cluster'),
    ('run_mask_frame.sh', dict(fshape=128, tshape=2, fstride=128, tstride=2),
     'configs/pretrain_joint_frame.py', 'frame'),
    ('run_mask_patch_tiny.sh', dict(model_size='tiny', batch_size=120, lr='5e-4'),
     'configs/pretrain_joint.py', 'cluster'),
    ('run_mask_patch.sh, pretrain_mpc', dict(task='pretrain_mpc'), 'configs/pretrain_mpc.py',
     'cluster'),
])
def test_the_original_pretraining_scripts(script, changes, config_file, mask_mode):
  variables = {**PRETRAIN_VARIABLES, **changes}
  argv = _argv(PRETRAIN_SCRIPT, **variables)
  if script == 'run_mask_patch_tiny.sh':
    argv[argv.index('4000')] = '800'
  run_plan, _ = run.plan(argv)
  assert run_plan.config_file == config_file and run_plan.notes == ()
  assert run_plan.workdir == './exp/mask01'
  settings = resolve(_config(argv), check_data=False)
  model, optim, objective, data = (settings.model, settings.optim, settings.objective,
                                   settings.data)
  assert (model.fshape, model.tshape, model.fstride, model.tstride) == (
      variables['fshape'], variables['tshape'], variables['fshape'], variables['tshape'])
  assert model.embed_dim == {'base': 768, 'tiny': 192}[variables['model_size']]
  assert objective.task == variables['task'] and objective.mask_patch == 400
  assert objective.mask_mode == mask_mode
  assert (optim.batch_size, optim.lr, optim.num_epochs, optim.lr_patience, optim.warmup) == (
      variables['batch_size'], float(variables['lr']), 10, 2, True)
  assert optim.epoch_iter == (800 if script == 'run_mask_patch_tiny.sh' else 4000)
  assert settings.run.print_every_steps == 100
  assert (data.train_json, data.val_json, data.label_csv) == (
      '/d/audioset_librispeech.json', '/d/eval_data.json', './data/class_labels_indices.csv')
  assert (data.mean, data.std, data.target_length, data.num_mel_bins) == (
      -4.2677393, 4.5689974, 1024, 128)
  assert data.train_audio and data.audio_root == os.getcwd()


# The users' run.sh: a fork's run.py on precomputed .pt features (docs/configuration.md).
USERS_RUN_SH = """--dataset precomputed \\
--data_train /ssast/combined_train_data.json --data_val /ssast/test.json \\
--data_dir /data/train --data_val_dir /data/val \\
--label-csv /ssast/class_labels_indices.csv \\
--dataset_mean -7.4482 --dataset_std 2.4689 --target_length 1024 --num_mel_bins 128 \\
--fshape 16 --tshape 16 --fstride 16 --tstride 16 --model_size base \\
--task pretrain_joint --mask_patch 400 --batch_size 24 --lr 0.0001 --n-epochs 10 \\
--exp-dir /ssast/exp --save_model True --freqm 0 --timem 0 --mixup 0 \\
--n-print-steps 100 --lr_patience 2 --epoch_iter 4000"""


def test_the_users_run_sh():
  run_plan, _ = run.plan(_argv(USERS_RUN_SH))
  assert run_plan.config_file == 'configs/pretrain_joint.py' and run_plan.notes == ()
  config, workdir = _main_py_config(run.command(run_plan))
  assert workdir == '/ssast/exp'
  assert _differences(config, defaults.get_config()) == {
      'data.train_json': ('/ssast/combined_train_data.json', ''),
      'data.val_json': ('/ssast/test.json', ''),
      'data.train_pt_dir': ('/data/train', ''), 'data.val_pt_dir': ('/data/val', ''),
      'data.label_csv': ('/ssast/class_labels_indices.csv', ''),
      'batch_size': (24, 12), 'num_epochs': (10, 20), 'lr_patience': (2, 1),
      'epoch_iter': (4000, 2000), 'print_every_steps': (100, 50)}
  resolve(config, check_data=False)


def test_left_out_pretraining_flags_are_the_originals_defaults():
  config = _config(['--task', 'pretrain_mpg', '--exp-dir', 'e'])
  assert (config.task, config.lr, config.num_epochs, config.batch_size) == (
      'pretrain_mpg', 0.001, 1, 12)


# --- fine-tuning: the original's recipes against configs/finetune_*.py -------------------

# src/finetune/esc50/run_esc_frame.sh (run_esc_patch.sh has no `--pretrain False`).
ESC_SCRIPT = """--dataset ${dataset} \\
  --data-train ${tr_data} --data-val ${te_data} --exp-dir $exp_dir \\
  --label-csv ./data/esc_class_labels_indices.csv --n_class 50 \\
  --lr $lr --n-epochs ${epoch} --batch-size $batch_size --save_model False \\
  --freqm $freqm --timem $timem --mixup ${mixup} --bal ${bal} \\
  --tstride $tstride --fstride $fstride --fshape ${fshape} --tshape ${tshape} \\
  --warmup False --task ${task} \\
  --model_size ${model_size} --adaptschedule False \\
  --pretrain False --pretrained_mdl_path ${pretrain_path} \\
  --dataset_mean ${dataset_mean} --dataset_std ${dataset_std} --target_length ${target_length} \\
  --num_mel_bins 128 --head_lr ${head_lr} --noise ${noise} \\
  --lrscheduler_start 6 --lrscheduler_step 1 --lrscheduler_decay 0.85 \\
  --wa False --loss CE --metrics acc"""
ESC_VARIABLES = dict(
    dataset='esc50', dataset_mean=-6.6268077, dataset_std=5.358466, target_length=512,
    noise=True, bal='none', lr='1e-4', freqm=24, timem=96, mixup=0, epoch=50, batch_size=48,
    fshape=16, tshape=16, fstride=10, tstride=10, task='ft_avgtok', model_size='base',
    head_lr=1, pretrain_path='./SSAST-Base-Patch-400.pth', exp_dir='./exp/fold1',
    tr_data='./data/datafiles/esc_train_data_1.json',
    te_data='./data/datafiles/esc_eval_data_1.json')

# src/finetune/speechcommands_v2_35/run_sc.sh
SC_SCRIPT = """--dataset ${dataset} \\
--data-train ${tr_data} --data-val ${val_data} --data-eval ${eval_data} --exp-dir $exp_dir \\
--label-csv ./data/speechcommands_class_labels_indices.csv --n_class 35 \\
--lr $lr --n-epochs ${epoch} --batch-size $batch_size --save_model False \\
--freqm $freqm --timem $timem --mixup ${mixup} --bal ${bal} \\
--tstride $tstride --fstride $fstride --fshape ${fshape} --tshape ${tshape} \\
--warmup True --task ${task} \\
--model_size ${model_size} --adaptschedule False \\
--pretrained_mdl_path ${pretrain_path} \\
--dataset_mean ${dataset_mean} --dataset_std ${dataset_std} --target_length ${target_length} \\
--num_mel_bins 128 --head_lr ${head_lr} --noise ${noise} \\
--lrscheduler_start 5 --lrscheduler_step 1 --lrscheduler_decay 0.85 \\
--wa False --loss BCE --metrics acc"""
SC_VARIABLES = dict(
    dataset='speechcommands', dataset_mean=-6.845978, dataset_std=5.5654526,
    target_length=128, noise=True, tr_data='./data/datafiles/speechcommand_train_data.json',
    val_data='./data/datafiles/speechcommand_valid_data.json',
    eval_data='./data/datafiles/speechcommand_eval_data.json', bal='none', lr='2.5e-4',
    freqm=48, timem=48, mixup=0.6, epoch=30, batch_size=128, fshape=128, tshape=2,
    fstride=128, tstride=1, task='ft_avgtok', model_size='base', head_lr=1,
    pretrain_path='./SSAST-Base-Frame-400.pth', exp_dir='./exp/sc')

# src/finetune/audioset/run_as.sh
AS_SCRIPT = """--dataset ${dataset} \\
--data-train ${tr_data} --data-val ${te_data} --exp-dir $exp_dir \\
--label-csv ./data/class_labels_indices.csv --n_class 527 \\
--lr $lr --n-epochs ${epoch} --batch-size $batch_size --save_model False \\
--freqm $freqm --timem $timem --mixup ${mixup} --bal ${bal} \\
--tstride $tstride --fstride $fstride --fshape ${fshape} --tshape ${tshape} \\
--warmup False --task ${task} \\
--model_size ${model_size} --adaptschedule False \\
--pretrained_mdl_path ${pretrain_path} \\
--dataset_mean ${dataset_mean} --dataset_std ${dataset_std} --target_length ${target_length} \\
--num_mel_bins 128 --head_lr ${head_lr} --noise ${noise} \\
--lrscheduler_start 10 --lrscheduler_step 5 --lrscheduler_decay 0.5 \\
--wa True --wa_start 6 --wa_end 25 \\
--loss BCE --metrics mAP"""
AS_VARIABLES = dict(
    dataset='audioset', dataset_mean=-4.2677393, dataset_std=4.5689974, target_length=1024,
    noise=False, task='ft_avgtok', model_size='base', head_lr=1, bal='none', lr='5e-5',
    epoch=25, tr_data='/d/balanced_train_data.json', te_data='/d/eval_data.json', freqm=48,
    timem=192, mixup=0.5, fstride=10, tstride=10, fshape=16, tshape=16, batch_size=12,
    pretrain_path='./SSAST-Base-Patch-400.pth', exp_dir='./exp/as')


def _expected_differences(variables, label_csv, wa=True):
  """What the run.py command sets and the recipe leaves to the command line (the paths; the
  audio the original reads), and the original's defaults of flags the script leaves out
  (--n-print-steps 100; --wa_start 16 and --wa_end 30, unused without --wa)."""
  differences = {
      'data.train_json': (variables['tr_data'], ''),
      'data.val_json': (variables.get('te_data', variables.get('val_data')), ''),
      'data.label_csv': (label_csv, ''), 'pretrained': (variables['pretrain_path'], ''),
      'data.train_audio': (True, False), 'data.audio_root': (os.getcwd(), ''),
      'print_every_steps': (100, 50)}
  if not wa:
    differences.update({'wa_start': (16, 1), 'wa_end': (30, 5)})
  return differences


@pytest.mark.parametrize('changes', [{}, dict(fshape=128, tshape=2, fstride=128, tstride=1)],
                         ids=['patch', 'frame'])
def test_the_original_esc50_recipes(changes):
  variables = {**ESC_VARIABLES, **changes}
  config = _config(_argv(ESC_SCRIPT, **variables))
  recipe = _recipe('finetune_esc50')
  recipe.fstride, recipe.tstride = variables['fstride'], variables['tstride']
  assert _differences(config, recipe) == _expected_differences(
      variables, './data/esc_class_labels_indices.csv', wa=False)
  resolve_finetune(config, check_data=False)


def test_the_original_speechcommands_recipe():
  argv = _argv(SC_SCRIPT, **SC_VARIABLES)
  config = _config(argv)
  assert any('--data-eval' in note and 'not evaluated' in note for note in run.plan(argv)[0].notes)
  assert _differences(config, _recipe('finetune_speechcommands')) == _expected_differences(
      SC_VARIABLES, './data/speechcommands_class_labels_indices.csv', wa=False)
  resolve_finetune(config, check_data=False)


def test_the_original_audioset_recipe():
  config = _config(_argv(AS_SCRIPT, **AS_VARIABLES))
  assert _differences(config, _recipe('finetune_audioset')) == _expected_differences(
      AS_VARIABLES, './data/class_labels_indices.csv')
  resolve_finetune(config, check_data=False)


def test_the_audioset_full_set_keeps_the_scripts_weight_averaging_window():
  """set=full: balanced sampling, lr 1e-5, 5 epochs, but the script still averages epochs
  6..25, which the original fails on after training; main.py refuses it before."""
  variables = {**AS_VARIABLES, 'bal': 'bal', 'lr': '1e-5', 'epoch': 5,
               'tr_data': '/d/whole_train_data.json'}
  config = _config(_argv(AS_SCRIPT, **variables))
  assert (config.bal, config.lr, config.num_epochs, config.wa_start, config.wa_end) == (
      True, 1e-5, 5, 6, 25)
  with pytest.raises(ConfigError, match='^wa_end must be in wa_start .. num_epochs'):
    resolve_finetune(config, check_data=False)


# --- refusals, notes and the command ------------------------------------------------------

FT = ['--exp-dir', 'e', '--pretrained_mdl_path', 'm.pth']


@pytest.mark.parametrize('argv, message', [
    (['--task', 'pretrain_joint', '--exp-dir', 'e', '--data_eval', 'x'], '--data-eval: '),
    (['--task', 'pretrain_mpc', '--exp-dir', 'e', '--freqm', '48'], '--freqm must be off'),
    (['--task', 'pretrain_mpc', '--exp-dir', 'e', '--timem', '10'], '--timem must be off'),
    (['--task', 'pretrain_mpg', '--exp-dir', 'e', '--mixup', '0.5'], '--mixup must be off'),
    (['--task', 'pretrain_joint', '--exp-dir', 'e', '--noise', 'True'], '--noise must be off'),
    (['--task', 'pretrain_joint', '--exp-dir', 'e', '--bal', 'bal'], '--bal must be off'),
    (['--task', 'pretrain_joint', '--exp-dir', 'e', '--model_size', 'base_nokd'],
     "--model_size base_nokd: the original's base_nokd"),
    (['--task', 'pretrain_joint', '--exp-dir', 'e', '--model_size', 'base384'],
     '--model_size base384: not a size'),
    (FT + ['--dataset', 'precomputed', '--data_dir', 'pt'], '--dataset precomputed: needs'),
    (FT + ['--data_val_dir', 'pt'], '--data_dir: missing'),
    (['--pretrained_mdl_path', 'm.pth'], '--exp-dir: missing'),
    (['--exp-dir', 'e', '--task', 'ft_cls'], '--pretrained_mdl_path: missing'),
    (FT + ['--n_class', '50', '--label-csv', 'LABELS'], '--n_class 50: --label-csv'),
    (FT + ['--optim', 'rmsprop'], "argument --optim: invalid choice: 'rmsprop'"),
    (FT + ['--task', 'ft_mean'], "argument --task: invalid choice: 'ft_mean'"),
    (FT + ['--loss', 'MSE'], "argument --loss: invalid choice: 'MSE'"),
    (FT + ['--wa', 'yes'], "argument --wa: invalid literal value: 'yes'"),
    (FT + ['--head_lr', '1.5'], "argument --head_lr: invalid int value: '1.5'"),
    (FT + ['--pretrain_stage', 'False'], 'unrecognized arguments: --pretrain_stage False'),
    (FT + ['--data_', 'x'], 'ambiguous option: --data_ could match --data-train, --data-val'),
])
def test_what_cannot_run_ends_in_one_line_naming_the_flag(argv, message, tmp_path, capsys,
                                                          monkeypatch):
  labels = tmp_path / 'labels.csv'
  labels.write_text('index,mid,display_name\n0,/m/a,a\n1,/m/b,b\n2,/m/c,c\n')
  argv = [str(labels) if a == 'LABELS' else a for a in argv]
  monkeypatch.setattr(os, 'execv', lambda *args: pytest.fail('ran main.py'))
  assert run.main(argv) == 2
  out, err = capsys.readouterr()
  assert out == ''
  assert err.count('\n') == 1 and err.startswith('error: ' + message), err


def test_n_class_equal_to_the_label_csv_passes(tmp_path):
  labels = tmp_path / 'labels.csv'
  labels.write_text('index,mid,display_name\n0,/m/a,a\n1,/m/b,b\n')
  run_plan, _ = run.plan(FT + ['--n_class', '2', '--label-csv', str(labels)])
  assert run_plan.values['data.label_csv'] == str(labels)


def test_flags_the_original_ignores_are_accepted_silently():
  quiet = ['--task', 'pretrain_joint', '--exp-dir', 'e']
  ignored = ['--n_class', '35', '--head_lr', '4', '--metrics', 'acc', '--loss', 'CE',
             '--wa', 'True', '--wa_end', '3', '--lrscheduler_decay', '0.1',
             '--pretrained_mdl_path', 'x.pth', '--save_model', 'True', '--adaptschedule',
             'True', '--optim', 'adam', '--freqm', '0', '--noise', 'False', '--bal', 'none',
             '--fstride', '16', '--dataset', 'asli']
  assert run.plan(quiet)[0] == run.plan(quiet + ignored)[0]
  finetuning = FT + ['--mask_patch', '100', '--cluster_factor', '5', '--epoch_iter', '7',
                     '--fshape', '128', '--tshape', '2', '--model_size', 'tiny']
  assert run.plan(FT)[0] == run.plan(finetuning)[0]


def test_flags_whose_effect_the_user_may_expect_are_noted():
  run_plan, _ = run.plan(['--task', 'pretrain_joint', '--exp-dir', 'e', '--optim', 'sgd',
                          '--warmup', 'False', '--fshape', '16', '--fstride', '10',
                          '--adaptschedule', 'False'])
  assert [note.split(':')[0] for note in run_plan.notes] == [
      '--warmup False is unused', '--optim sgd is unused', '--adaptschedule False is unused',
      '--fstride 10 is unused']
  assert run_plan.values['model.fstride'] == 16
  assert run.plan(FT + ['--optim', 'sgd'])[0].notes[0].startswith('--optim sgd is unused')


def test_dry_run_prints_the_command_shell_quoted():
  argv = _argv(ESC_SCRIPT, **{**ESC_VARIABLES, 'tr_data': "'my data/train 1.json'"})
  result = subprocess.run([sys.executable, '-m', 'ssast_jax.run', *argv, '--dry_run'],
                          cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0 and result.stderr == ''
  words = shlex.split(result.stdout.replace('\\\n', ' '))
  assert words == run.command(run.plan(argv)[0])
  assert words[:4] == ['python', 'main.py', '--config=configs/finetune.py',
                       '--workdir=./exp/fold1']
  assert '--config.data.train_json=my data/train 1.json' in words


def test_refusal_from_the_command_line():
  result = subprocess.run([sys.executable, '-m', 'ssast_jax.run', '--task', 'pretrain_mpc',
                           '--exp-dir', 'e', '--freqm', '24'],
                          cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.startswith('error: --freqm must be off') and result.stderr.count('\n') == 1


def test_without_dry_run_main_py_replaces_the_process(monkeypatch, capsys):
  argv = ['--task', 'pretrain_mpg', '--exp-dir', 'e', '--lr', '1e-4']
  calls = []
  monkeypatch.setattr(os, 'execv', lambda path, args: calls.append((path, args)))
  run.main(argv)
  words = run.command(run.plan(argv)[0])
  assert calls == [(sys.executable, [sys.executable, *words[1:]])]
  assert words[1].endswith('main.py') and words[2].endswith('configs/pretrain_mpg.py')
  assert words[3:] == ['--workdir=e', '--config.num_epochs=1', '--config.print_every_steps=100',
                       '--config.data.train_audio=True',
                       f'--config.data.audio_root={os.getcwd()}']
  assert capsys.readouterr().out == run.shell_text(words) + '\n'


def test_docs_map_every_flag():
  docs = open(os.path.join(ROOT, 'docs', 'configuration.md'), encoding='utf-8').read()
  section = docs.split('## From `run.py` to `main.py`', 1)[1]
  assert [f.name for f in FLAGS if f'`{f.name}' not in section] == []
