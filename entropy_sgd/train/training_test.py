"""The shared training loop on the tiny CIFAR files in testdata/."""

import glob
import json
import os
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from entropy_sgd.core import noise
from entropy_sgd.train import checkpoints
from entropy_sgd.train import config as config_lib
from entropy_sgd.train import run_dir
from entropy_sgd.train import training

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                        "testdata")


def tiny_config(opt, log_dir, **overrides):
  """WRN-10-1 on 200 images in batches of 20: 10 outer steps per epoch."""
  settings = dict(
      dataset="cifar10", data_dir=os.path.join(TESTDATA, "cifar10"),
      log_dir=log_dir, model="wrn-10-1", epochs=1, batch_size=20, lr=0.05,
      L=2, log_every_steps=3, recalibration_batches=2)
  if opt == "entropy_sgd":
    settings.update(lr=0.5, langevin_lr=0.05)
  settings.update(overrides)
  return config_lib.from_preset(opt, **settings)


def scalar_tags(run_dir):
  accumulator = event_accumulator.EventAccumulator(
      run_dir, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return accumulator, set(accumulator.Tags()["tensors"])


class MakeOptimizerTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((None, False), (True, True), (False, False))
  def test_outer_weight_decay_overrides_the_conventions(self, flag, expected):
    config = config_lib.from_preset("entropy_sgd", outer_weight_decay=flag)
    optimizer = training.make_optimizer(config, tf.Variable(1.0))
    self.assertEqual(optimizer.conventions.outer_weight_decay, expected)
    self.assertEqual(optimizer.conventions.outer_scale, "one")  # The rest.

  def test_sam_and_adam(self):
    sam = training.make_optimizer(config_lib.from_preset(
        "sam", sam_adaptive=True), tf.Variable(0.1))
    self.assertEqual((type(sam).__name__, sam.rho, sam.adaptive, sam.eta),
                     ("SAM", 0.5, True, 0.01))
    adam = training.make_optimizer(config_lib.from_preset("adam"),
                                   tf.Variable(1e-3))
    self.assertEqual((type(adam).__name__, adam.epsilon), ("Adam", 1e-8))


class RunLockTest(tf.test.TestCase):

  def test_a_refused_resume_releases_the_lock(self):
    log_dir = self.create_tempdir().full_path
    training.train(tiny_config("sgd", log_dir, run_name="run"))
    with self.assertRaisesRegex(run_dir.RunDirError, "--lr 0.05 -> 0.01"):
      training.train(tiny_config("sgd", log_dir, run_name="run", lr=0.01,
                                 epochs=2))
    # The same process may lock the directory again: nothing leaked.
    summary = training.train(tiny_config("sgd", log_dir, run_name="run",
                                         epochs=2))
    self.assertEqual(summary["run_dir"], os.path.join(log_dir, "run"))


def read_config(run_directory):
  with open(os.path.join(run_directory, "config.json")) as f:
    return json.load(f)


def write_config(run_directory, values):
  with open(os.path.join(run_directory, "config.json"), "w") as f:
    json.dump(values, f)


class NoiseImplementationTest(tf.test.TestCase):
  """--noise_kernel: the resolved implementation is used, logged, recorded
  in config.json and kept on resume."""

  def test_the_resolved_implementation_is_used_and_recorded(self):
    log_dir = self.create_tempdir().full_path
    expected_auto = noise.resolve("auto")  # "kernel" where it is built.
    for choice, opt, name, reason in (
        ("off", "entropy_sgd", noise.TENSORFLOW,
         "off: TensorFlow's ops requested"),
        ("auto", "entropy_sgd", expected_auto.name, expected_auto.reason),
        ("on", "sgd", noise.NONE, "--opt=sgd draws no Langevin noise")):
      with self.assertLogs(level="INFO") as logs:
        trainer = training.Trainer(tiny_config(
            opt, log_dir, run_name=f"{opt}_{choice}", max_steps=1,
            noise_kernel=choice))
      trainer.run()
      record = read_config(trainer.run_dir)
      self.assertEqual(record[config_lib.NOISE_IMPLEMENTATION], name)
      self.assertEqual(record[config_lib.NOISE_IMPLEMENTATION_REASON], reason)
      started = [line for line in logs.output if "Langevin noise:" in line]
      if opt == "sgd":
        self.assertEmpty(started)
        continue
      self.assertLen(started, 1)
      self.assertIn(reason, started[0])
      self.assertEqual(trainer.optimizer.use_noise_kernel,
                       name == noise.KERNEL)

  def test_a_resume_that_would_switch_implementation_is_refused(self):
    log_dir = self.create_tempdir().full_path
    first = training.train(tiny_config("entropy_sgd", log_dir, run_name="run",
                                       max_steps=2, noise_kernel="off"))
    record = read_config(first["run_dir"])
    self.assertEqual(record[config_lib.NOISE_IMPLEMENTATION], noise.TENSORFLOW)
    # As if the first start had drawn with the kernel on another machine.
    record[config_lib.NOISE_IMPLEMENTATION] = noise.KERNEL
    write_config(first["run_dir"], record)
    with self.assertRaises(run_dir.RunDirError) as caught:
      training.train(tiny_config("entropy_sgd", log_dir, run_name="run",
                                 max_steps=4, noise_kernel="off"))
    message = str(caught.exception)
    self.assertNotIn("\n", message)
    self.assertStartsWith(
        message, f"{first['run_dir']} drew its Langevin noise with the "
        f"compiled kernel, but here it would use TensorFlow's ops (off: "
        f"TensorFlow's ops requested), and the two drift apart at float "
        f"round-off. Rerun with the old values (--noise_kernel=on, on a "
        f"machine where the kernel loads) to resume it, pass "
        f"--allow_config_change to continue it under the new ones and "
        f"accept the drift")
    # Accepted with the override, and recorded with its step.
    resumed = training.train(tiny_config(
        "entropy_sgd", log_dir, run_name="run", max_steps=4,
        noise_kernel="off", allow_config_change=True))
    self.assertEqual(resumed["outer_steps"], 4)
    record = read_config(first["run_dir"])
    self.assertEqual(record[config_lib.NOISE_IMPLEMENTATION], noise.TENSORFLOW)
    self.assertEqual(
        [(change["step"], change["overridden"]) for change in
         record[run_dir.CHANGES_KEY]],
        [(2, {config_lib.NOISE_IMPLEMENTATION: [noise.KERNEL,
                                                noise.TENSORFLOW]})])

  def test_an_older_record_without_it_resumes_with_a_warning(self):
    log_dir = self.create_tempdir().full_path
    first = training.train(tiny_config("entropy_sgd", log_dir, run_name="run",
                                       max_steps=2, noise_kernel="off"))
    record = read_config(first["run_dir"])
    del record[config_lib.NOISE_IMPLEMENTATION]
    del record[config_lib.NOISE_IMPLEMENTATION_REASON]
    write_config(first["run_dir"], record)
    with self.assertLogs(level="WARNING") as logs:
      resumed = training.train(tiny_config(
          "entropy_sgd", log_dir, run_name="run", max_steps=4,
          noise_kernel="off"))
    self.assertEqual(resumed["outer_steps"], 4)
    self.assertTrue(any("does not record which implementation drew the "
                        "Langevin noise" in line for line in logs.output),
                    logs.output)
    self.assertEqual(read_config(first["run_dir"])[
        config_lib.NOISE_IMPLEMENTATION], noise.TENSORFLOW)

  def test_on_without_a_usable_kernel_is_one_line_and_writes_nothing(self):
    log_dir = self.create_tempdir().full_path
    missing = os.path.join(log_dir, "missing.so")
    with mock.patch.dict(os.environ, {noise.PATH_VARIABLE: missing}):
      with self.assertRaises(config_lib.ConfigError) as caught:
        training.Trainer(tiny_config("entropy_sgd", log_dir,
                                     noise_kernel="on"))
    self.assertEqual(str(caught.exception), (
        f"--noise_kernel=on, but the compiled noise kernel is missing: "
        f"{noise.PATH_VARIABLE}={missing} does not exist; unset "
        f"{noise.PATH_VARIABLE} or point it at a built library; or pass "
        f"--noise_kernel=off (TensorFlow's ops: the same distribution, "
        f"slower on CPUs)."))
    with self.assertRaisesRegex(config_lib.ConfigError,
                                "with XLA, which cannot run it; drop --jit or "
                                "pass --noise_kernel=off"):
      training.Trainer(tiny_config("entropy_sgd", log_dir, noise_kernel="on",
                                   jit=True))
    self.assertEmpty(os.listdir(log_dir))


class TrainingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("sgd", "nesterov", "entropy_sgd")
  def test_smoke_writes_events_and_checkpoints(self, opt):
    log_dir = self.create_tempdir().full_path
    summary = training.train(tiny_config(opt, log_dir, max_steps=4))
    run_dir = summary["run_dir"]
    self.assertEqual(summary["outer_steps"], 4)
    evaluations = 2 if opt == "entropy_sgd" else 1
    self.assertAlmostEqual(summary["effective_epochs"],
                           4 * evaluations * 20 / 200)
    self.assertBetween(summary["final_test_accuracy"], 0.0, 1.0)
    self.assertTrue(np.isfinite(summary["final_test_loss"]))
    self.assertNotEmpty(glob.glob(os.path.join(run_dir, "checkpoints",
                                               "ckpt-4.index")))
    accumulator, tags = scalar_tags(run_dir)
    expected = {"train/loss", "train/accuracy", "test/loss", "test/accuracy",
                "optimizer/learning_rate", "perf/images_per_second",
                "progress/effective_epoch", "progress/outer_epoch"}
    if opt == "entropy_sgd":
      expected |= {"entropy_sgd/gamma", "entropy_sgd/anchor_to_mean_distance",
                   "optimizer/langevin_learning_rate"}
    self.assertContainsSubset(expected, tags)
    # The step axis counts gradient evaluations.
    steps = [e.step for e in accumulator.Tensors("train/loss")]
    self.assertEqual(steps, [3 * evaluations, 4 * evaluations])

  def test_entropy_sgd_gamma_grows_in_the_summaries(self):
    log_dir = self.create_tempdir().full_path
    summary = training.train(tiny_config(
        "entropy_sgd", log_dir, max_steps=6, scoping=0.5, log_every_steps=1))
    accumulator, _ = scalar_tags(summary["run_dir"])
    gammas = [float(tf.make_ndarray(e.tensor_proto))
              for e in accumulator.Tensors("entropy_sgd/gamma")]
    # Lua-reference preset: gamma_t = gamma0 (1 + gamma1)^(t + 1).
    self.assertAllClose(gammas, [0.03 * 1.5**(t + 1) for t in range(6)],
                        rtol=1e-5)

  def test_resume_equals_an_uninterrupted_run(self):
    log_dir = self.create_tempdir().full_path
    common = dict(epochs=2, deterministic=True, validation_examples=40,
                  augment="flip_crop")
    whole = training.train(tiny_config("entropy_sgd", log_dir,
                                       run_name="whole", **common))
    first = training.train(tiny_config("entropy_sgd", log_dir,
                                       run_name="split", max_steps=8,
                                       **common))
    self.assertEqual(first["outer_steps"], 8)
    resumed = training.train(tiny_config("entropy_sgd", log_dir,
                                         run_name="split", **common))
    self.assertEqual(resumed["outer_steps"], whole["outer_steps"])
    expected = checkpoints.checkpoint_model_variables(whole["run_dir"])
    actual = checkpoints.checkpoint_model_variables(resumed["run_dir"])
    self.assertSameElements(expected, actual)
    for name in expected:
      self.assertAllClose(actual[name], expected[name], rtol=1e-5, atol=1e-6,
                          msg=name)
    self.assertAllClose(resumed["final_validation_accuracy"],
                        whole["final_validation_accuracy"])

  def test_evaluation_only_settings_do_not_move_the_weights(self):
    log_dir = self.create_tempdir().full_path
    common = dict(deterministic=True, validation_examples=40,
                  augment="flip_crop", eval_every_steps=4)
    changed = dict(recalibrate_bn=False, recalibration_batches=1,
                   recalibration_augment=False, track_flatness_every_steps=3)
    self.assertEqual(set(changed), config_lib.EVALUATION_ONLY_FIELDS)
    runs = [training.train(tiny_config("entropy_sgd", log_dir, run_name=name,
                                       **common, **settings))
            for name, settings in (("default", {}), ("changed", changed))]
    weights = [checkpoints.checkpoint_model_variables(r["run_dir"])
               for r in runs]
    trained = [n for n in weights[0] if "moving_" not in n]
    self.assertNotEmpty(trained)
    for name in trained:
      self.assertAllEqual(weights[1][name], weights[0][name], msg=name)

  def test_divergence_keeps_the_last_good_checkpoint(self):
    log_dir = self.create_tempdir().full_path
    good = training.train(tiny_config("sgd", log_dir, run_name="run"))
    checkpoint_dir = os.path.join(good["run_dir"], "checkpoints")
    before = {path: open(path, "rb").read()
              for path in glob.glob(os.path.join(checkpoint_dir, "*"))}
    with self.assertRaisesRegex(checkpoints.DivergenceError,
                                "loss is (nan|inf).*ckpt-10.*is intact"):
      training.train(tiny_config("sgd", log_dir, run_name="run", epochs=2,
                                 lr=1e30, allow_config_change=True))
    after = {path: open(path, "rb").read()
             for path in glob.glob(os.path.join(checkpoint_dir, "*"))}
    self.assertEqual(before, after)

  def test_float16_overflows_are_skipped_not_divergence(self):
    log_dir = self.create_tempdir().full_path
    trainer = training.Trainer(tiny_config(
        "entropy_sgd", log_dir, max_steps=4, log_every_steps=1,
        precision="mixed_float16"))
    trainer.loss_scale.scale.assign(2.0**60)  # All 8 updates overflow.
    summary = trainer.run()
    self.assertEqual(summary["outer_steps"], 4)
    self.assertTrue(np.isfinite(summary["final_test_loss"]))
    self.assertEqual(int(trainer.loss_scale.skipped_updates.numpy()), 8)
    accumulator, tags = scalar_tags(summary["run_dir"])
    self.assertContainsSubset({"precision/loss_scale",
                               "precision/skipped_updates"}, tags)
    scales = [float(tf.make_ndarray(e.tensor_proto))
              for e in accumulator.Tensors("precision/loss_scale")]
    self.assertEqual(scales, [2.0**58, 2.0**56, 2.0**54, 2.0**52])
    # At the scale's floor an overflow is genuine: the run has diverged.
    with self.assertRaisesRegex(checkpoints.DivergenceError, "loss is nan"):
      trainer = training.Trainer(tiny_config(
          "sgd", log_dir, run_name="floor", precision="mixed_float16",
          lr=1e30))
      trainer.loss_scale.scale.assign(1.0)
      trainer.run()

  @parameterized.parameters(True, False)
  def test_batch_norm_recalibration_uses_the_current_weights(self, augment):
    log_dir = self.create_tempdir().full_path
    config = tiny_config("entropy_sgd", log_dir, max_steps=2,
                         recalibration_batches=1,
                         recalibration_augment=augment)
    summary = training.train(config)
    del summary
    # Recalibrating with one batch makes the (debiased) moving mean of the
    # first BatchNorm exactly that batch's mean of the stem output, the
    # batch augmented as in training or not, as asked.
    trainer = training.Trainer(config)  # Restores the trained weights.
    trainer.evaluator.recalibrate_batch_norm(epoch=0)
    first_bn = trainer.model.blocks[0].batch_norms[0]
    moving_mean = tf.reshape(first_bn.moving_mean.value, [-1])
    means = {}
    for augmented in (True, False):
      images, _ = next(iter(trainer.data.recalibration_dataset(
          0, augment=augmented)))
      means[augmented] = tf.reduce_mean(trainer.model.stem(images),
                                        axis=[0, 1, 2])
    self.assertAllClose(moving_mean, means[augment], atol=1e-5)
    self.assertNotAllClose(moving_mean, means[not augment], atol=1e-3)

  def test_a_run_from_before_augmented_recalibration_resumes_as_it_was(self):
    log_dir = self.create_tempdir().full_path
    first = training.train(tiny_config("entropy_sgd", log_dir, run_name="run",
                                       max_steps=1))
    record = read_config(first["run_dir"])
    self.assertIs(record["recalibration_augment"], True)
    del record["recalibration_augment"]  # As an older version wrote it.
    write_config(first["run_dir"], record)
    with self.assertRaisesRegex(
        run_dir.RunDirError, r"other settings: --recalibration_augment "
        r"False -> True\. Rerun with the old values"):
      training.train(tiny_config("entropy_sgd", log_dir, run_name="run",
                                 max_steps=2))
    resumed = training.train(tiny_config(
        "entropy_sgd", log_dir, run_name="run", max_steps=2,
        recalibration_augment=False))
    self.assertEqual(resumed["outer_steps"], 2)

  def test_static_shapes_and_xla_as_tpus_need(self):
    """What TPUStrategy needs, checked on CPU (no TPU here).

    Every distributed input has fully static per-replica shapes (training,
    recalibration, padded evaluation); the XLA-compiled functions of the
    traced training step (forward/backward with synchronised BatchNorm, the
    update math) have static input shapes and run; padded evaluation counts
    every test image exactly once.
    """
    log_dir = self.create_tempdir().full_path
    trainer = training.Trainer(tiny_config(
        "entropy_sgd", log_dir, jit=True, sync_batch_norm=True, max_steps=1))
    strategy, data = trainer.strategy, trainer.data
    inputs = {
        "train": data.train_dataset,
        "recalibration": lambda context: data.recalibration_dataset(0,
                                                                    context),
        "test": lambda context: data.eval_dataset("test", context, pad=True)}
    for name, dataset_fn in inputs.items():
      spec = strategy.distribute_datasets_from_function(
          dataset_fn).element_spec
      for tensor_spec in tf.nest.flatten(spec):
        self.assertTrue(tensor_spec.shape.is_fully_defined(),
                        f"{name}: {tensor_spec}")

    iterator = iter(strategy.distribute_datasets_from_function(
        inputs["train"]))
    library = trainer.train_step.compiled.get_concrete_function(
        iterator, tf.constant(1)).graph.as_graph_def().library
    compiled = [f for f in library.function
                if "_XlaMustCompile" in f.attr and f.attr["_XlaMustCompile"].b]
    self.assertTrue(any("forward_backward" in f.signature.name
                        for f in compiled))
    for function in compiled:
      for attrs in function.arg_attr.values():
        for shape in attrs.attr["_output_shapes"].list.shape:
          self.assertTrue(tf.TensorShape(shape).is_fully_defined(),
                          function.signature.name)

    summary = trainer.run()  # Compiles and runs the XLA functions.
    self.assertEqual(summary["outer_steps"], 1)
    losses, correct = [], []
    for images, labels in data.eval_dataset("test"):  # Unpadded, 20+20+10.
      logits = trainer.model(images, is_training=False)
      losses.append(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels, logits))
      correct.append(tf.argmax(logits, -1, output_type=tf.int32) == labels)
    self.assertLen(tf.concat(losses, 0), 50)
    self.assertAllClose(summary["final_test_loss"],
                        tf.reduce_mean(tf.concat(losses, 0)), rtol=1e-5)
    self.assertAllClose(summary["final_test_accuracy"],
                        tf.reduce_mean(tf.cast(tf.concat(correct, 0),
                                               tf.float32)))

  def test_unwritable_log_dir(self):
    blocker = self.create_tempfile().full_path  # A file, not a directory.
    with self.assertRaisesRegex(config_lib.ConfigError,
                                "--log_dir: cannot write"):
      training.train(tiny_config("sgd", os.path.join(blocker, "runs")))


if __name__ == "__main__":
  tf.test.main()
