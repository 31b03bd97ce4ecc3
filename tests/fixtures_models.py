"""User model factories, as a user's own package would write them.

Referenced from specs as ``kind: "tests.fixtures_models:make_torch_mlp"``.
Frameworks are imported inside the factories so that importing this module
stays cheap and framework-free.
"""

from __future__ import annotations


def make_torch_mlp(n_features: int, n_outputs: int):
    from torch import nn

    return nn.Sequential(nn.Linear(n_features, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, n_outputs))


def make_keras_mlp(n_features: int, n_outputs: int):
    import keras

    return keras.Sequential(
        [
            keras.Input((n_features,)),
            keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-4)),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(n_outputs),  # logits: the backend applies softmax
        ]
    )


def make_not_a_model(n_features: int, n_outputs: int):
    return {"n_features": n_features, "n_outputs": n_outputs}


def make_wrong_width(n_features: int, n_outputs: int):
    from torch import nn

    return nn.Linear(n_features, n_outputs + 1)


NOT_CALLABLE = 42
