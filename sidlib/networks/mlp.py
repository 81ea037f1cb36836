"""MLPNet: a small residual MLP denoiser for low-dimensional data stored as ``[N, C, 1, 1]`` "images", so the
preconditioning wrappers, losses and samplers serve it unchanged, e.g.
``EDMPrecond(img_resolution=1, img_channels=2, model_type='MLPNet', model_channels=128, num_layers=4)``.
"""

import torch
import torch.nn.functional as F

from .layers import GroupNorm, Linear, noise_embedding, song_embed

__all__ = ['MLPNet', 'MLPBlock']

_INIT = dict(init_mode='xavier_uniform')
# Near-zero output layers: every block starts as the identity and D(x) near c_skip x (as SongUNet's init_zero).
_INIT_ZERO = dict(init_mode='xavier_uniform', init_weight=1e-5)


class MLPBlock(torch.nn.Module):
    """``x + fc1(drop(silu(fc0(silu(norm0(x))) + affine(emb))))``: ``x [N, C], emb [N, E] -> [N, C]``."""

    def __init__(self, channels, emb_channels, dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.norm0 = GroupNorm(channels, num_groups=1)
        self.fc0 = Linear(channels, channels, **_INIT)
        self.affine = Linear(emb_channels, channels, **_INIT)
        self.fc1 = Linear(channels, channels, **_INIT_ZERO)

    def forward(self, x, emb):
        h = self.fc0(F.silu(self.norm0(x))) + self.affine(emb).to(x.dtype)
        h = self.fc1(F.dropout(F.silu(h), p=self.dropout, training=self.training))
        return x + h


class MLPNet(torch.nn.Module):
    """Residual MLP ``F(x; c_noise, labels)`` on the ``C R R`` flattened features; ``model_channels`` is the hidden
    and embedding width, ``num_layers`` the number of blocks, ``embedding_type`` 'positional' or 'fourier'; the rest
    as SongUNet."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, num_layers=4, dropout=0.0, label_dropout=0,
                 embedding_type='positional'):
        super().__init__()
        self.img_resolution = img_resolution
        self.out_channels = out_channels
        self.label_dropout = label_dropout
        in_features = in_channels * img_resolution * img_resolution
        out_features = out_channels * img_resolution * img_resolution

        self.map_noise = noise_embedding(embedding_type, model_channels)
        self.map_label = Linear(label_dim, model_channels, **_INIT) if label_dim else None
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **_INIT) if augment_dim else None
        self.map_layer0 = Linear(model_channels, model_channels, **_INIT)
        self.map_layer1 = Linear(model_channels, model_channels, **_INIT)

        self.inp = Linear(in_features, model_channels, **_INIT)
        self.blocks = torch.nn.ModuleList([MLPBlock(model_channels, model_channels, dropout)
                                           for _ in range(num_layers)])
        self.out_norm = GroupNorm(model_channels, num_groups=1)
        self.out = Linear(model_channels, out_features, **_INIT_ZERO)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        return song_embed(self, self.map_noise(noise_labels), class_labels, augment_labels)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        h = self.out(F.silu(self.out_norm(h)))
        return h.reshape(x.shape[0], self.out_channels, self.img_resolution, self.img_resolution)
