"""SongUNet: EDM's DDPM++ / NCSN++ U-Net (EDM's ``training/networks.py``), with EDM's module names, registration
order and shapes (``model.enc.32x32_block0.conv0.weight`` ...), so EDM state_dicts load strictly. The variants
differ in kwargs only (see :data:`sidlib.networks.ARCHITECTURES`).
"""

import numpy as np
import torch
import torch.nn.functional as F

from .layers import Conv2d, GroupNorm, Linear, UNetBlock, noise_embedding, song_embed

__all__ = ['SongUNet']


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net ``F(x [N, C, R, R]; noise_labels [N], class_labels [N, label_dim] | None,
    augment_labels [N, augment_dim] | None) -> [N, C_out, R, R]``; constructor arguments are EDM's."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type='positional',
                 channel_mult_noise=1, encoder_type='standard', decoder_type='standard',
                 resample_filter=[1, 1]):
        if encoder_type not in ('standard', 'skip', 'residual'):
            raise ValueError(f'encoder_type must be standard, skip or residual, not {encoder_type!r}')
        if decoder_type not in ('standard', 'skip'):
            raise ValueError(f'decoder_type must be standard or skip, not {decoder_type!r}')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
                            skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                            resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network (the registration order fixes the state_dict order).
        self.map_noise = noise_embedding(embedding_type, noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder; `caux` is the width of the auxiliary (input-image or residual) path.
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

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
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        # EDM's SongUNet feeds [sin, cos] rather than [cos, sin]: swap the two halves.
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        return song_embed(self, emb, class_labels, augment_labels)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder; `aux` accumulates the output image.
        aux = tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux
