"""Presets, schedule and validation of training configurations."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized

from entropy_sgd.train import config as config_lib


class PresetTest(parameterized.TestCase):

  def test_sgd_presets_follow_the_wrn_recipe(self):
    for opt in ("sgd", "nesterov"):
      c = config_lib.from_preset(opt)
      self.assertEqual((c.model, c.epochs, c.batch_size, c.lr, c.momentum,
                        c.weight_decay),
                       ("wrn-28-10", 200, 128, 0.1, 0.9, 5e-4))
      self.assertEqual(c.lr_decay_epochs, (60, 120, 160))
      self.assertEqual(c.gradient_evaluations_per_step, 1)

  def test_entropy_sgd_preset_follows_the_paper(self):
    c = config_lib.from_preset("entropy_sgd")
    self.assertEqual((c.L, c.epochs, c.lr, c.langevin_lr, c.noise, c.gamma,
                      c.scoping), (20, 10, 1.0, 0.1, 1e-4, 0.03, 1e-3))
    self.assertEqual(c.gradient_evaluations_per_step, 20)
    # lr 1 divided by 5 every 4 epochs.
    self.assertEqual([config_lib.learning_rate_at(c, e) for e in range(10)],
                     [1.0] * 4 + [0.2] * 4 + [0.2 * 0.2] * 2)

  def test_overrides_win_over_the_preset(self):
    c = config_lib.from_preset("entropy_sgd", L=5, model="wrn-16-1")
    self.assertEqual((c.L, c.model, c.gamma), (5, "wrn-16-1", 0.03))

  def test_sgd_schedule(self):
    c = config_lib.from_preset("nesterov")
    lrs = [config_lib.learning_rate_at(c, e) for e in (0, 59, 60, 120, 199)]
    self.assertSequenceAlmostEqual(lrs, [0.1, 0.1, 0.02, 0.004, 0.0008])

  def test_every_paper_recipe_value_names_its_source(self):
    self.assertEqual(set(config_lib.PAPER_RECIPE),
                     set(config_lib.PAPER_RECIPE_SOURCES))
    for key, values in config_lib.PAPER_RECIPE.items():
      sources = config_lib.PAPER_RECIPE_SOURCES[key]
      self.assertEqual(set(values), set(sources), key)
      for name, source in sources.items():
        self.assertRegex(source, r"Sec\. 5|\.lua|\.py|Springenberg",
                         (key, name))
    text = config_lib.describe_paper_recipe("mnist")
    self.assertIn("--recipe=paper --model=mnistfc --opt=entropy_sgd:", text)
    self.assertIn("--gamma=0.0001  (Sec. 5.1", text)
    self.assertNotIn("allcnn", text)
    self.assertIn("--preprocess=gcn_zca  (Sec. 5.2",
                  config_lib.describe_paper_recipe("cifar10"))

  def test_mnist_presets_follow_train_lua(self):
    sgd = config_lib.from_preset("nesterov", dataset="mnist")
    self.assertEqual((sgd.model, sgd.epochs, sgd.augment, sgd.weight_decay),
                     ("lenet", 100, "none", 0.0))
    self.assertSequenceAlmostEqual(
        [config_lib.learning_rate_at(sgd, e) for e in (0, 29, 30, 59, 60, 99)],
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.004])
    lenet = config_lib.from_preset("entropy_sgd", dataset="mnist")
    self.assertEqual((lenet.epochs, lenet.L, lenet.gamma, lenet.conventions),
                     (5, 20, 1e-4, "lua_reference"))
    self.assertSequenceAlmostEqual(
        [config_lib.learning_rate_at(lenet, e) for e in range(5)],
        [1.0, 1.0, 0.1, 0.1, 0.1])
    mnistfc = config_lib.from_preset("entropy_sgd", dataset="mnist",
                                     model="mnistfc")
    # gamma0: train.lua's default, its line 10.
    self.assertEqual((mnistfc.epochs, mnistfc.gamma), (5, 1e-4))
    self.assertSequenceAlmostEqual(
        [config_lib.learning_rate_at(mnistfc, e) for e in range(5)],
        [1.0, 1.0, 0.1, 0.1, 0.1])

  def test_allcnn_presets_follow_train_lua(self):
    sgd = config_lib.from_preset("sgd", model="allcnn")
    self.assertEqual((sgd.epochs, sgd.weight_decay, sgd.lr_decay_epochs),
                     (200, 1e-3, (60, 120, 180)))
    esgd = config_lib.from_preset("entropy_sgd", model="allcnn")
    self.assertSequenceAlmostEqual(
        [config_lib.learning_rate_at(esgd, e) for e in range(10)],
        [1.0] * 3 + [0.2] * 3 + [0.04] * 4)

  def test_overrides_of_the_model_pick_its_preset(self):
    self.assertEqual(config_lib.from_preset(
        "entropy_sgd", dataset="mnist", model="mnistfc", L=5).L, 5)
    with self.assertRaisesRegex(config_lib.ConfigError,
                                "--model=lenet is built for mnist"):
      config_lib.from_preset("sgd", model="lenet")

  def test_fractional_decay_epochs(self):
    c = config_lib.from_preset("entropy_sgd", epochs=1,
                               lr_decay_epochs=(0.4, 0.8))
    self.assertSequenceAlmostEqual(
        [config_lib.learning_rate_at(c, e) for e in (0.0, 0.39, 0.4, 0.8)],
        [1.0, 1.0, 0.2, 0.04])

  def test_run_names(self):
    self.assertEqual(
        config_lib.from_preset("entropy_sgd", seed=3).default_run_name(),
        "cifar10_wrn-28-10_entropy_sgd_L20_seed3")
    self.assertEqual(config_lib.from_preset("sgd").default_run_name(),
                     "cifar10_wrn-28-10_sgd_seed0")


class PaperRecipeTest(parameterized.TestCase):
  """--recipe=paper: the values of Sec. 5 of the ICLR 2017 text."""

  @parameterized.parameters("mnistfc-iclr17", "lenet-iclr17")
  def test_adam_baseline(self, model):
    c = config_lib.from_preset("adam", "mnist", model, recipe="paper")
    self.assertEqual((c.opt, c.lr, c.lr_decay_epochs, c.lr_decay_factor,
                      c.epochs, c.dropout, c.init, c.augment),
                     ("adam", 1e-3, (30, 60, 90), 0.2, 100, 0.5, "torch",
                      "none"))
    self.assertEqual((c.adam_beta1, c.adam_beta2, c.adam_epsilon),
                     (0.9, 0.999, 1e-8))

  @parameterized.parameters(("mnistfc-iclr17", 0.15, 10),
                            ("lenet-iclr17", 0.25, 5))
  def test_entropy_sgd(self, model, dropout, epochs):
    c = config_lib.from_preset("entropy_sgd", "mnist", model, recipe="paper")
    self.assertEqual((c.dropout, c.noise, c.gamma, c.scoping, c.langevin_lr,
                      c.L, c.lr, c.epochs, c.lr_decay_factor),
                     (dropout, 1e-3, 1e-4, 1e-3, 0.1, 20, 1.0, epochs, 0.1))
    self.assertEqual(c.lr_decay_epochs[0], 2)  # "after the second epoch".
    self.assertEqual((c.weight_decay, c.conventions, c.init),
                     (0.0, "lua_reference", "torch"))

  def test_cifar10_all_cnn(self):
    sgd = config_lib.from_preset("nesterov", "cifar10", recipe="paper")
    esgd = config_lib.from_preset("entropy_sgd", "cifar10", recipe="paper")
    for c in (sgd, esgd):
      self.assertEqual((c.model, c.preprocess, c.augment, c.dropout,
                        c.weight_decay),
                       ("allcnn", "gcn_zca", "none", 0.5, 1e-3))
    self.assertEqual((sgd.epochs, sgd.lr, sgd.lr_decay_epochs),
                     (200, 0.1, (60, 120, 180)))
    self.assertEqual((esgd.epochs, esgd.lr, esgd.lr_decay_epochs,
                      esgd.lr_decay_factor, esgd.noise, esgd.gamma),
                     (10, 1.0, (4, 8), 0.2, 1e-4, 0.03))

  def test_default_models_are_the_paper_era_nets(self):
    c = config_lib.from_preset("adam", "mnist", recipe="paper")
    self.assertEqual(c.model, "lenet-iclr17")

  def test_only_what_the_paper_ran(self):
    with self.assertRaisesRegex(config_lib.ConfigError,
                                "ran no --opt=nesterov.*reference_code"):
      config_lib.from_preset("nesterov", "mnist", "lenet", recipe="paper")
    with self.assertRaisesRegex(config_lib.ConfigError, "--recipe="):
      config_lib.from_preset("adam", "mnist", recipe="lua")

  def test_reference_code_recipe_is_unchanged_by_the_new_fields(self):
    c = config_lib.from_preset("entropy_sgd", "mnist", "mnistfc")
    self.assertEqual((c.recipe, c.init, c.preprocess, c.gamma, c.noise),
                     ("reference_code", None, "standardize", 1e-4, 1e-4))
    self.assertEqual(c.default_run_name(),
                     "mnist_mnistfc_entropy_sgd_L20_seed0")

  def test_run_names_tell_recipes_and_initialisations_apart(self):
    names = {
        config_lib.from_preset("adam", "mnist", "lenet-iclr17",
                               recipe="paper").default_run_name(),
        config_lib.from_preset("adam", "mnist",
                               "lenet-iclr17").default_run_name(),
        config_lib.from_preset("nesterov", "mnist", "lenet",
                               init="torch").default_run_name(),
        config_lib.from_preset("nesterov", "mnist", "lenet",
                               init="he").default_run_name(),
    }
    self.assertLen(names, 4)

  def test_bad_new_values(self):
    for overrides, message in (
        (dict(init="xavier"), "--init="),
        (dict(model="wrn-16-1", init="torch"), "paper's nets"),
        (dict(preprocess="whiten"), "--preprocess="),
        (dict(adam_beta1=1.0), "--adam_beta1"),
        (dict(adam_epsilon=0.0), "--adam_epsilon")):
      with self.assertRaisesRegex(config_lib.ConfigError, message):
        config_lib.from_preset("adam", "cifar10", **overrides)
    with self.assertRaisesRegex(config_lib.ConfigError, "for CIFAR"):
      config_lib.from_preset("adam", "mnist", preprocess="gcn_zca")

  def test_gradient_evaluations_count_the_anchor_gradient(self):
    c = config_lib.from_preset("entropy_sgd", L=5,
                               conventions="pytorch_reference")
    self.assertEqual(c.gradient_evaluations_per_step, 6)
    self.assertEqual(config_lib.from_preset(
        "entropy_sgd", L=5).gradient_evaluations_per_step, 5)


class SamConfigTest(parameterized.TestCase):

  def test_preset_is_nesterovs_with_two_evaluations_per_step(self):
    sam = config_lib.from_preset("sam", model="wrn-16-1")
    nesterov = config_lib.from_preset("nesterov", model="wrn-16-1")
    for field in ("epochs", "lr", "lr_decay_epochs", "momentum",
                  "weight_decay", "batch_size"):
      self.assertEqual(getattr(sam, field), getattr(nesterov, field), field)
    self.assertEqual(sam.gradient_evaluations_per_step, 2)

  def test_default_radius_per_variant(self):
    self.assertEqual(config_lib.sam_rho(config_lib.from_preset("sam")), 0.05)
    self.assertEqual(config_lib.sam_rho(config_lib.from_preset(
        "sam", sam_adaptive=True)), 0.5)
    self.assertEqual(config_lib.sam_rho(config_lib.from_preset(
        "sam", sam_rho=0.1, sam_adaptive=True)), 0.1)
    self.assertEqual(config_lib.from_preset(
        "sam", sam_adaptive=True).default_run_name(),
                     "cifar10_wrn-28-10_asam_seed0")

  def test_bad_values(self):
    for overrides, message in ((dict(sam_rho=0.0), "--sam_rho"),
                               (dict(sam_perturbation="all"),
                                "--sam_perturbation"),
                               (dict(precision="mixed_float16"),
                                "mixed_float16")):
      with self.assertRaisesRegex(config_lib.ConfigError, message):
        config_lib.from_preset("sam", **overrides)


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      (dict(L=0), "--L must be >= 1"),
      (dict(lr=0.0), "--lr must be > 0"),
      (dict(lr=-1.0), "--lr must be > 0"),
      (dict(langevin_lr=0.0), "--langevin_lr must be > 0"),
      (dict(model="resnet50"), "--model='resnet50' is unknown"),
      (dict(model="wrn-27-10"), "^--model=wrn-27-10: .*depth must be 6n\\+4"),
      (dict(model="lenet"), "^--model=lenet is built for mnist, not cifar10; "
       "choose one of allcnn, wrn-DEPTH-WIDTH"),
      (dict(precision="bfloat16"), "^--precision='bfloat16' is unknown; choose "
       "one of float32, mixed_bfloat16, mixed_float16"),
      (dict(dataset="svhn"), "--dataset='svhn' is unknown"),
      (dict(strategy="tpu_pod"), "--strategy='tpu_pod' is unknown"),
      (dict(tpu="my-tpu"), "--tpu='my-tpu' needs --strategy=tpu"),
      (dict(epochs=0), "--epochs must be >= 1"),
      (dict(batch_size=0), "--batch_size must be >= 1"),
      (dict(momentum=1.0), "--momentum must be in"),
      (dict(gamma=0.0), "--gamma must be > 0"),
      (dict(alpha=0.0), "--alpha must be in"),
      (dict(conventions="torch"), "--conventions='torch' is unknown"),
      (dict(max_steps=0), "--max_steps must be >= 1"),
      (dict(augment="mixup"), "--augment='mixup' is unknown"),
      (dict(validation_examples=-1), "--validation_examples must be >= 0"),
      (dict(rho=0.0), "--rho must be > 0"),
      # The launchers once passed --outer_weight_decay=false as a string.
      (dict(outer_weight_decay="false"),
       "^--outer_weight_decay must be true or false; got 'false'"),
      (dict(noise_kernel="yes"), "--noise_kernel='yes' is unknown; choose "
       "one of auto, on, off"),
  )
  def test_bad_values_name_the_flag(self, overrides, message):
    with self.assertRaisesRegex(config_lib.ConfigError, message):
      config_lib.from_preset("entropy_sgd", **overrides)

  @parameterized.parameters(
      (dict(model="wrn-16-1"), "^--model=wrn-16-1 is built for cifar10/"
       "cifar100, not mnist; choose one of mnistfc, lenet"),
      (dict(model="allcnn"), "^--model=allcnn is built for"),
      (dict(sync_batch_norm=True),
       "^--sync_batch_norm is implemented for the Wide ResNets"),
      (dict(steps_per_loop=0), "^--steps_per_loop must be >= 1"),
      (dict(precision="fp16"), "^--precision='fp16' is unknown"),
  )
  def test_bad_mnist_values_name_the_flag(self, overrides, message):
    with self.assertRaisesRegex(config_lib.ConfigError, message):
      config_lib.from_preset("nesterov", dataset="mnist", **overrides)

  def test_parle_needs_entropy_sgd(self):
    with self.assertRaisesRegex(config_lib.ConfigError, "--parle needs"):
      config_lib.from_preset("nesterov", parle=True)

  def test_unknown_opt(self):
    with self.assertRaisesRegex(config_lib.ConfigError,
                                "--opt='rmsprop' is unknown"):
      config_lib.from_preset("rmsprop")

  def test_messages_are_one_line(self):
    try:
      config_lib.from_preset("sgd", model="wrn-27-10")
    except config_lib.ConfigError as e:
      self.assertNotIn("\n", str(e))
    else:
      self.fail("wrn-27-10 was accepted")

  def test_unread_fields(self):
    sgd = config_lib.unread_fields({"opt": "sgd", "augment": "flip_crop"})
    esgd = config_lib.unread_fields({"opt": "entropy_sgd", "parle": False})
    self.assertTrue({"L", "gamma", "sam_rho", "adam_beta1",
                     "rotation_degrees"} <= sgd)
    self.assertNotIn("momentum", sgd)
    self.assertTrue({"momentum", "rho"} <= esgd)
    self.assertNotIn("L", esgd)
    self.assertNotIn("rho", config_lib.unread_fields(
        {"opt": "entropy_sgd", "parle": True}))

  def test_noise_kernel_only_asks(self):
    # Every choice is valid; auto (today's behaviour) is the default. What
    # it resolves to is recorded and compared on resume, not the choice.
    self.assertEqual(config_lib.TrainConfig.noise_kernel, "auto")
    for choice in ("auto", "on", "off"):
      self.assertEqual(config_lib.from_preset(
          "entropy_sgd", noise_kernel=choice).noise_kernel, choice)
    self.assertIn("noise_kernel", config_lib.RESUME_MAY_CHANGE)
    self.assertNotIn(config_lib.NOISE_IMPLEMENTATION,
                     config_lib.RESUME_MAY_CHANGE)
    self.assertIn("noise_kernel", config_lib.unread_fields({"opt": "sgd"}))
    self.assertNotIn("noise_kernel", config_lib.unread_fields(
        {"opt": "entropy_sgd"}))

  def test_every_field_describes_itself(self):
    for field in dataclasses.fields(config_lib.TrainConfig):
      self.assertGreater(len(field.metadata[config_lib.HELP]), 10, field.name)
      self.assertTrue(callable(field.metadata[config_lib.READ_WHEN]))
    self.assertEqual(config_lib.TrainConfig.lr, 0.1)  # Defaults stay plain.
    self.assertIn("seed", config_lib.NOT_EXPERIMENT_FIELDS)
    self.assertNotIn("lr", config_lib.NOT_EXPERIMENT_FIELDS)
    self.assertIn("epochs", config_lib.RESUME_MAY_CHANGE)
    self.assertNotIn("lr", config_lib.RESUME_MAY_CHANGE)
    # Read only with a rotating augmentation, a mirrored strategy, ASAM.
    self.assertNotIn("rotation_degrees", config_lib.unread_fields(
        {"opt": "sgd", "augment": "flip_rotate"}))
    self.assertIn("num_devices", config_lib.unread_fields({"opt": "sgd"}))
    self.assertNotIn("num_devices", config_lib.unread_fields(
        {"opt": "sgd", "strategy": "mirrored"}))
    self.assertIn("sam_eta", config_lib.unread_fields({"opt": "sam"}))
    self.assertNotIn("sam_eta", config_lib.unread_fields(
        {"opt": "sam", "sam_adaptive": True}))

  def test_recalibration_augment_is_read_when_recalibrating_augmented(self):
    read = lambda **values: "recalibration_augment" not in (
        config_lib.unread_fields(values))
    self.assertTrue(read(opt="entropy_sgd", augment="flip_crop"))
    self.assertFalse(read(opt="entropy_sgd", augment="none"))
    self.assertFalse(read(opt="entropy_sgd", augment="flip_crop",
                          recalibrate_bn=False))
    self.assertFalse(read(opt="nesterov", augment="flip_crop"))

  def test_a_record_without_a_new_field_means_the_old_behaviour(self):
    # Before recalibration_augment existed, recalibration was un-augmented.
    self.assertIs(config_lib.TrainConfig.recalibration_augment, True)
    old = {"opt": "entropy_sgd", "lr": 1.0}
    completed = config_lib.complete_record(old)
    self.assertIs(completed["recalibration_augment"], False)
    self.assertEqual(old, {"opt": "entropy_sgd", "lr": 1.0})  # Not changed.
    self.assertEqual(completed["lr"], 1.0)
    self.assertNotIn("gamma", completed)  # Only fields that say so.
    recorded = config_lib.complete_record({"recalibration_augment": True})
    self.assertIs(recorded["recalibration_augment"], True)

  def test_pipeline_config_is_what_training_feeds(self):
    from entropy_sgd.workloads import data  # pylint: disable=g-import-not-at-top
    config = config_lib.from_preset(
        "nesterov", dataset="cifar100", batch_size=64, data_dir="/d",
        validation_examples=500, augment="flip_rotate", rotation_degrees=7.0,
        preprocess="gcn_zca", seed=3)
    pipeline = config_lib.pipeline_config(config, batch_size=32)
    shared = {f.name for f in dataclasses.fields(data.PipelineConfig)} & {
        f.name for f in dataclasses.fields(config_lib.TrainConfig)}
    self.assertGreaterEqual(len(shared), 8)
    for name in shared - {"batch_size"}:
      self.assertEqual(getattr(pipeline, name), getattr(config, name), name)
    self.assertEqual(pipeline.batch_size, 32)

  def test_one_rotation_default(self):
    from entropy_sgd.workloads import data  # pylint: disable=g-import-not-at-top
    self.assertEqual(config_lib.TrainConfig.rotation_degrees,
                     data.PipelineConfig.rotation_degrees)


if __name__ == "__main__":
  absltest.main()
