"""The small Keras CNN of the example, which the Keras benchmark times too."""

import keras


def small_cnn(num_classes=10):
  """Two convolutions, global pooling, logits; 32x32x3 images."""
  return keras.Sequential([
      keras.Input([32, 32, 3]),
      keras.layers.Conv2D(32, 3, activation="relu"),
      keras.layers.MaxPooling2D(),
      keras.layers.Conv2D(64, 3, activation="relu"),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dense(num_classes),
  ])
