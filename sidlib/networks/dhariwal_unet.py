"""DhariwalUNet: the ADM U-Net (Dhariwal & Nichol 2021) of EDM's ``training/networks.py`` (ImageNet-64). Unlike
SongUNet: scale/shift conditioning, skip_scale 1, GroupNorm eps 1e-5, weightless skips in resampling blocks of
unchanged width, 64 channels per head, no sin/cos swap, labels added after ``map_layer1`` without sqrt scaling.
"""

import numpy as np
import torch
import torch.nn.functional as F

from .layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, drop_labels

__all__ = ['DhariwalUNet']


class DhariwalUNet(torch.nn.Module):
    """ADM U-Net ``F(x; noise_labels, class_labels, augment_labels)`` (shapes as SongUNet); EDM's arguments."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                            init=init, init_zero=init_zero)

        # Mapping network (registration order fixes the state_dict order: map_label last).
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, init_mode='kaiming_normal',
                                   init_weight=np.sqrt(2)) if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                 init_weight=np.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder: every `block{idx}` consumes one skip, concatenated after the features.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
