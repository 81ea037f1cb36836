"""Tests for sidlib.networks: EDM-compatible architectures and their forward pass.

* The paper's architectures (sidlib's table ``PAPER_NETWORKS``) are built on the meta device and
  compared with key lists generated from EDM's ``training/networks.py`` (``tests/data/edm_keys``):
  names, order, shapes, buffers, constructor kwargs and parameter counts.
* The forward pass of tiny SongUNet (DDPM++, NCSN++, skip encoder/decoder) and DhariwalUNet
  configurations is compared with an independent functional re-derivation written below: it reads
  the state_dict and uses its own group norm, its own FIR resampling (explicit shifted sums,
  transposed convolution as zero insertion), and explicit index arithmetic for the interleaved qkv.
* Individual traps (qkv layout, sin/cos swap, label scaling, GroupNorm eps, preconditioning
  formulas), the precision setting (``set_precision``) and the performance options (sdpa,
  channels_last) are tested directly.
"""

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sidlib.networks as nets
from sidlib.networks import (ARCHITECTURES, MODEL_TYPES, PAPER_NETWORKS, PRECOND_TYPES, DhariwalUNet, EDMPrecond,
                             MLPNet, SongUNet, VEPrecond, VPPrecond, build_network, edm_kwargs, paper_network,
                             set_attention_backend, set_precision)
from sidlib.networks import layers

# Key lists generated from EDM's training/networks.py for the paper's architectures (vendored test data).
EDM_KEYS = Path(__file__).resolve().parent / 'data' / 'edm_keys'


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """These models are tiny: one intra-op thread avoids oversubscription on shared CPUs (10x faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

# ----------------------------------------------------------------------------------------------
# Paper architectures: sidlib's table (sidlib.networks.PAPER_NETWORKS) against EDM's key lists.

#: PAPER_NETWORKS name -> key list of its architecture. AFHQv2 64x64 has FFHQ 64x64's architecture (EDM's
#: README trains both with --arch=ddpmpp --cres=1,2,2,2; only the dropout differs, which has no parameters).
KEY_LIST_OF = {'cifar10-uncond': 'cifar10-uncond', 'cifar10-cond': 'cifar10-cond', 'ffhq64': 'ffhq64',
               'afhqv2-64': 'ffhq64', 'imagenet64-cond': 'imagenet64', 'cifar10-ncsnpp': 'cifar10-ncsnpp'}


def build_meta(kwargs):
    """Build an EDMPrecond without allocating memory (parameters live on the meta device)."""
    with torch.device('meta'):
        return EDMPrecond(**kwargs)


def read_key_list(name):
    """(kwargs, [(key, shape)], header-dict) from an edm_keys/<name>.txt file."""
    lines = (EDM_KEYS / f'{name}.txt').read_text().splitlines()
    kwargs = ast.literal_eval(lines[0].split('kwargs', 1)[1].strip())
    header = dict(item.split('=') for item in lines[1].lstrip('# ').split())
    keys = []
    for line in lines[2:]:
        if line.strip():
            key, shape = line.split('\t')
            keys.append((key, list(ast.literal_eval(shape))))
    return kwargs, keys, {k: int(v) for k, v in header.items()}


def test_every_key_list_is_covered_by_the_table():
    assert set(KEY_LIST_OF) == set(PAPER_NETWORKS)
    assert set(KEY_LIST_OF.values()) == {p.stem for p in EDM_KEYS.glob('*.txt')}
    assert set(json.loads((EDM_KEYS / 'module_tree.json').read_text())) == set(KEY_LIST_OF.values())


@pytest.mark.parametrize('name', list(PAPER_NETWORKS))
def test_paper_parameter_counts(name):
    # The count in EDM's key list is independent of sidlib; the table's own field must agree with both.
    _, _, header = read_key_list(KEY_LIST_OF[name])
    net = build_meta(paper_network(name))
    assert sum(p.numel() for p in net.parameters()) == header['params']
    assert PAPER_NETWORKS[name]['parameters'] == header['params']


@pytest.mark.parametrize('name', list(PAPER_NETWORKS))
def test_state_dict_matches_edm_key_list(name):
    kwargs, keys, header = read_key_list(KEY_LIST_OF[name])
    net = build_meta(paper_network(name))
    got = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    # Same names, same order, same shapes.
    assert got == keys
    assert len(got) == header['tensors_in_state_dict']
    assert sum(1 for _ in net.buffers()) == header['buffers']
    # init_kwargs records exactly what was passed; the table's kwargs equal the ones EDM's code was run with
    # (dropout aside for AFHQv2, which shares FFHQ's key list).
    assert net.init_kwargs == paper_network(name)
    table = paper_network(name)
    if name == 'afhqv2-64':
        del table['dropout'], kwargs['dropout']
    assert table == kwargs


@pytest.mark.parametrize('name', list(PAPER_NETWORKS))
def test_module_order_matches_edm_tree(name):
    key_list = KEY_LIST_OF[name]
    tree = json.loads((EDM_KEYS / 'module_tree.json').read_text())[key_list]
    net = build_meta(paper_network(name))
    assert list(net.model.enc.keys()) == tree['enc']
    assert list(net.model.dec.keys()) == tree['dec']
    assert [[k, list(v.shape)] for k, v in net.named_buffers()] == [list(b) for b in tree['buffers']]
    assert sum(p.numel() for p in net.parameters()) == tree['params']


def test_table_arch_names_and_edm_kwargs():
    for name, entry in PAPER_NETWORKS.items():
        # Each network is its --arch's inner kwargs plus resolution, channels, labels and extras.
        assert ARCHITECTURES[entry['arch']].items() <= entry['kwargs'].items(), name
    # Overrides come last; the table hands out copies.
    assert edm_kwargs('ddpmpp', img_resolution=8, channel_mult=(1, 2), model_channels=16)['model_channels'] == 16
    copy_ = paper_network('cifar10-uncond')
    copy_['channel_mult'].append(4)
    assert paper_network('cifar10-uncond')['channel_mult'] == [2, 2, 2]
    with pytest.raises(ValueError, match='unknown architecture'):
        edm_kwargs('ddpm', img_resolution=32, channel_mult=[1])
    with pytest.raises(KeyError, match='cifar10-uncond'):
        paper_network('cifar100')


# ----------------------------------------------------------------------------------------------
# Independent functional reference.

def randomize_(module, seed):
    """Replace every parameter by well-scaled random values (the default init zeros some layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif 'norm' in name and name.endswith('weight'):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def fir_taps_2d(taps, like):
    v = np.asarray(taps, dtype=np.float64)
    return torch.as_tensor(np.outer(v, v) / v.sum() ** 2, dtype=like.dtype)


def fir_correlate(x, f, stride):
    """Valid (unpadded) correlation of every channel with the 2-D filter f, written as shifted sums."""
    L = f.shape[0]
    H, W = x.shape[-2:]
    Ho, Wo = (H - L) // stride + 1, (W - L) // stride + 1
    out = 0
    for a in range(L):
        for b in range(L):
            out = out + f[a, b] * x[:, :, a:a + stride * (Ho - 1) + 1:stride, b:b + stride * (Wo - 1) + 1:stride]
    return out


def ref_down(x, taps):
    f = fir_taps_2d(taps, x)
    p = (len(taps) - 1) // 2
    return fir_correlate(F.pad(x, [p] * 4), f, 2)


def ref_up(x, taps):
    # Transposed convolution (stride 2, padding p, kernel 4f) == insert zeros between pixels, pad by
    # L-1-p and correlate with the flipped kernel.
    f = 4 * fir_taps_2d(taps, x).flip(0, 1)
    L, p = len(taps), (len(taps) - 1) // 2
    N, C, H, W = x.shape
    z = x.new_zeros(N, C, 2 * H - 1, 2 * W - 1)
    z[:, :, ::2, ::2] = x
    return fir_correlate(F.pad(z, [L - 1 - p] * 4), f, 1)


def ref_group_norm(x, weight, bias, eps):
    N, C = x.shape[:2]
    G = min(32, C // 4)
    t = x.reshape(N, G, -1)
    mean = t.mean(dim=-1, keepdim=True)
    var = ((t - mean) ** 2).mean(dim=-1, keepdim=True)
    t = ((t - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return t * weight.reshape(1, C, 1, 1) + bias.reshape(1, C, 1, 1)


class Ref:
    """Functional forward of the EDM networks computed straight from a state_dict."""

    def __init__(self, sd, eps, skip_scale, adaptive, taps, heads):
        self.sd, self.eps, self.skip_scale = sd, eps, skip_scale
        self.adaptive, self.taps, self.heads = adaptive, taps, heads

    def lin(self, x, name):
        y = x @ self.sd[name + '.weight'].T
        if name + '.bias' in self.sd:
            y = y + self.sd[name + '.bias']
        return y

    def conv(self, x, name, extra_pad=0, bias=True):
        w = self.sd[name + '.weight']
        y = F.conv2d(x, w, padding=w.shape[-1] // 2 + extra_pad)
        if bias and name + '.bias' in self.sd:
            y = y + self.sd[name + '.bias'].reshape(1, -1, 1, 1)
        return y

    def gn(self, x, name):
        return ref_group_norm(x, self.sd[name + '.weight'], self.sd[name + '.bias'], self.eps)

    def attention(self, h, name):
        C = h.shape[1]
        heads = self.heads(C)
        Ch = C // heads
        t = self.conv(self.gn(h, name + '.norm2'), name + '.qkv')
        N, _, H, W = t.shape
        t = t.reshape(N, 3 * C, H * W)
        out = torch.zeros(N, C, H * W, dtype=h.dtype)
        for hd in range(heads):
            q = t[:, [(hd * Ch + c) * 3 + 0 for c in range(Ch)]]
            k = t[:, [(hd * Ch + c) * 3 + 1 for c in range(Ch)]]
            v = t[:, [(hd * Ch + c) * 3 + 2 for c in range(Ch)]]
            w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(Ch), dim=-1)   # [N, query, key]
            out[:, hd * Ch:(hd + 1) * Ch] = v @ w.transpose(1, 2)
        return (self.conv(out.reshape(N, C, H, W), name + '.proj') + h) * self.skip_scale

    def block(self, x, emb, name, up=False, down=False, attn=False):
        h = F.silu(self.gn(x, name + '.norm0'))
        h = ref_up(h, self.taps) if up else ref_down(h, self.taps) if down else h
        h = self.conv(h, name + '.conv0')
        e = self.lin(emb, name + '.affine')[:, :, None, None]
        if self.adaptive:
            C = h.shape[1]
            h = F.silu(self.gn(h, name + '.norm1') * (1 + e[:, :C]) + e[:, C:])
        else:
            h = F.silu(self.gn(h + e, name + '.norm1'))
        h = self.conv(h, name + '.conv1')
        s = ref_up(x, self.taps) if up else ref_down(x, self.taps) if down else x
        if name + '.skip.weight' in self.sd:
            s = self.conv(s, name + '.skip')
        h = (h + s) * self.skip_scale
        return self.attention(h, name) if attn else h


def fp32_freqs(half, denominator):
    """(1/10000)^(i/denominator), i < half, tabulated in fp32 as EDM does whatever the activation dtype."""
    exponents = torch.tensor([i / denominator for i in range(half)], dtype=torch.float32)
    return torch.pow(torch.tensor(1e-4, dtype=torch.float32), exponents)


def ref_song_unet(sd, cfg, x, noise, labels=None, aug=None):
    R, mc, mult = cfg['img_resolution'], cfg['model_channels'], cfg['channel_mult']
    nb, attn_res = cfg['num_blocks'], cfg['attn_resolutions']
    taps = cfg['resample_filter']
    ref = Ref(sd, eps=1e-6, skip_scale=math.sqrt(0.5), adaptive=False, taps=taps, heads=lambda C: 1)

    # Embedding, already in the swapped [sin, cos] order.
    if cfg['embedding_type'] == 'positional':
        half = mc * cfg['channel_mult_noise'] // 2
        freqs = fp32_freqs(half, half - 1).to(x.dtype)
        arg = noise[:, None] * freqs[None, :]
    else:
        arg = 2 * math.pi * noise[:, None] * sd['map_noise.freqs'][None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    if cfg.get('label_dim'):
        emb = emb + ref.lin(labels * math.sqrt(cfg['label_dim']), 'map_label')
    if cfg.get('augment_dim') and aug is not None:
        emb = emb + ref.lin(aug, 'map_augment')
    emb = F.silu(ref.lin(F.silu(ref.lin(emb, 'map_layer0')), 'map_layer1'))

    skips, aux = [], x
    h = ref.conv(x, f'enc.{R}x{R}_conv')
    skips.append(h)
    for level in range(len(mult)):
        r = R >> level
        if level > 0:
            h = ref.block(h, emb, f'enc.{r}x{r}_down', down=True)
            skips.append(h)
            if cfg['encoder_type'] == 'skip':
                aux = ref_down(aux, taps)
                h = h + ref.conv(aux, f'enc.{r}x{r}_aux_skip')
                skips[-1] = h
            if cfg['encoder_type'] == 'residual':
                name = f'enc.{r}x{r}_aux_residual'
                t = fir_correlate(ref.conv(aux, name, extra_pad=(len(taps) - 1) // 2, bias=False),
                                  fir_taps_2d(taps, x), 2) + sd[name + '.bias'].reshape(1, -1, 1, 1)
                h = aux = (h + t) / math.sqrt(2)
                skips[-1] = h
        for i in range(nb):
            h = ref.block(h, emb, f'enc.{r}x{r}_block{i}', attn=r in attn_res)
            skips.append(h)

    out = None
    for level in reversed(range(len(mult))):
        r = R >> level
        if level == len(mult) - 1:
            h = ref.block(h, emb, f'dec.{r}x{r}_in0', attn=True)
            h = ref.block(h, emb, f'dec.{r}x{r}_in1')
        else:
            h = ref.block(h, emb, f'dec.{r}x{r}_up', up=True)
        for i in range(nb + 1):
            h = torch.cat([h, skips.pop()], dim=1)
            h = ref.block(h, emb, f'dec.{r}x{r}_block{i}', attn=(i == nb and r in attn_res))
        if cfg['decoder_type'] == 'skip' or level == 0:
            if out is not None:
                out = ref_up(out, taps)
            t = ref.conv(F.silu(ref.gn(h, f'dec.{r}x{r}_aux_norm')), f'dec.{r}x{r}_aux_conv')
            out = t if out is None else out + t
    assert not skips
    return out


def ref_dhariwal_unet(sd, cfg, x, noise, labels=None, aug=None):
    R, mc, mult = cfg['img_resolution'], cfg['model_channels'], cfg['channel_mult']
    nb, attn_res = cfg['num_blocks'], cfg['attn_resolutions']
    ref = Ref(sd, eps=1e-5, skip_scale=1.0, adaptive=True, taps=[1, 1], heads=lambda C: C // 64)

    half = mc // 2
    freqs = fp32_freqs(half, half).to(x.dtype)
    arg = noise[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)       # no swap in ADM
    if cfg.get('augment_dim') and aug is not None:
        emb = emb + aug @ sd['map_augment.weight'].T
    emb = ref.lin(F.silu(ref.lin(emb, 'map_layer0')), 'map_layer1')
    if cfg.get('label_dim'):
        assert 'map_label.bias' not in sd
        emb = emb + labels @ sd['map_label.weight'].T                 # after map_layer1, unscaled
    emb = F.silu(emb)

    skips = []
    h = ref.conv(x, f'enc.{R}x{R}_conv')
    skips.append(h)
    for level in range(len(mult)):
        r = R >> level
        if level > 0:
            h = ref.block(h, emb, f'enc.{r}x{r}_down', down=True)
            skips.append(h)
        for i in range(nb):
            h = ref.block(h, emb, f'enc.{r}x{r}_block{i}', attn=r in attn_res)
            skips.append(h)
    for level in reversed(range(len(mult))):
        r = R >> level
        if level == len(mult) - 1:
            h = ref.block(h, emb, f'dec.{r}x{r}_in0', attn=True)
            h = ref.block(h, emb, f'dec.{r}x{r}_in1')
        else:
            h = ref.block(h, emb, f'dec.{r}x{r}_up', up=True)
        for i in range(nb + 1):
            h = ref.block(torch.cat([h, skips.pop()], dim=1), emb, f'dec.{r}x{r}_block{i}', attn=r in attn_res)
    assert not skips
    return ref.conv(F.silu(ref.gn(h, 'out_norm')), 'out_conv')


def inner_kwargs(arch, **kw):
    """Inner-network kwargs of one of EDM's ``--arch`` names (sidlib's table), scaled down by ``kw``."""
    out = {k: v for k, v in ARCHITECTURES[arch].items() if k != 'model_type'}
    out.update(kw)
    return out


TINY = {
    'ddpmpp': (SongUNet, ref_song_unet, inner_kwargs(
        'ddpmpp', img_resolution=16, in_channels=3, out_channels=3, label_dim=4, augment_dim=9, model_channels=16,
        channel_mult=[1, 2, 2], channel_mult_emb=2, num_blocks=2, attn_resolutions=[8], dropout=0.0)),
    'ncsnpp': (SongUNet, ref_song_unet, inner_kwargs(
        'ncsnpp', img_resolution=16, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=16,
        channel_mult=[1, 2, 2], channel_mult_emb=2, num_blocks=2, attn_resolutions=[8], dropout=0.0)),
    'song-skip': (SongUNet, ref_song_unet, inner_kwargs(
        'ddpmpp', img_resolution=16, in_channels=2, out_channels=2, label_dim=3, augment_dim=0, model_channels=16,
        channel_mult=[1, 2, 1], channel_mult_emb=2, num_blocks=1, attn_resolutions=[16, 4], dropout=0.0,
        encoder_type='skip', decoder_type='skip', resample_filter=[1, 3, 3, 1])),
    'adm': (DhariwalUNet, ref_dhariwal_unet, inner_kwargs(
        'adm', img_resolution=8, in_channels=3, out_channels=3, label_dim=5, augment_dim=9, model_channels=64,
        channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[8, 4], dropout=0.0)),
}


def tiny_inputs(cfg, n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    R, C = cfg['img_resolution'], cfg['in_channels']
    x = torch.randn(n, C, R, R, generator=g, dtype=dtype)
    sigma = torch.exp(torch.randn(n, generator=g, dtype=dtype) * 1.2 - 1.2)
    labels = None
    if cfg.get('label_dim'):
        labels = F.one_hot(torch.randint(cfg['label_dim'], (n,), generator=g), cfg['label_dim']).to(dtype)
    aug = torch.randn(n, cfg['augment_dim'], generator=g, dtype=dtype) if cfg.get('augment_dim') else None
    return x, sigma, labels, aug


def build_tiny(key, seed=1):
    cls, ref_fn, cfg = TINY[key]
    torch.manual_seed(seed)
    net = randomize_(cls(**cfg), seed).eval()
    return net, ref_fn, cfg


@pytest.mark.parametrize('key', list(TINY))
def test_inner_forward_matches_reference_float64(key):
    net, ref_fn, cfg = build_tiny(key)
    net = net.double()
    x, sigma, labels, aug = tiny_inputs(cfg, dtype=torch.float64)
    noise = sigma.log() / 4
    with torch.no_grad():
        ours = net(x, noise, labels, augment_labels=aug)
        ref = ref_fn(net.state_dict(), cfg, x, noise, labels, aug)
    assert ours.shape == x.shape[:1] + (cfg['out_channels'],) + x.shape[2:]
    assert ref.abs().max() > 0.1   # the comparison is not vacuous
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('key', list(TINY))
def test_edm_precond_forward_matches_reference_fp32(key):
    inner, ref_fn, cfg = build_tiny(key)
    kwargs = {k: v for k, v in cfg.items() if k not in ('in_channels', 'out_channels')}
    net = EDMPrecond(img_channels=cfg['in_channels'], model_type=type(inner).__name__, **kwargs).eval()
    net.model.load_state_dict(inner.state_dict())
    x, sigma, labels, aug = tiny_inputs(cfg, seed=3)
    with torch.no_grad():
        ours = net(x, sigma, labels, augment_labels=aug)
    # Reference in float64 with the EDM formulas written out.
    sd = {k: v.double() for k, v in inner.state_dict().items()}
    xd, s = x.double(), sigma.double().reshape(-1, 1, 1, 1)
    sd_ = 0.5
    F_x = ref_fn(sd, cfg, xd / torch.sqrt(s ** 2 + sd_ ** 2), torch.log(sigma.double()) / 4,
                 None if labels is None else labels.double(), None if aug is None else aug.double())
    ref = sd_ ** 2 / (s ** 2 + sd_ ** 2) * xd + s * sd_ / torch.sqrt(s ** 2 + sd_ ** 2) * F_x
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Individual traps.

def test_qkv_interleaved_layout(monkeypatch):
    """Channel (h*C_head + c)*3 + j of the qkv output must become slot j, channel c, head h."""
    C, heads, n = 8, 2, 2
    Ch = C // heads
    block = layers.UNetBlock(C, C, emb_channels=4, attention=True, num_heads=heads,
                             adaptive_scale=False).eval()
    with torch.no_grad():
        block.qkv.weight.zero_()
        block.qkv.bias.copy_(torch.arange(3 * C, dtype=torch.float32))   # channel i carries value i
        block.proj.weight.copy_(torch.eye(C).reshape(C, C, 1, 1))
        block.proj.bias.zero_()
    seen = {}
    real_attention = layers.attention

    def spy(q, k, v, backend='math'):
        seen.update(q=q, k=k, v=v)
        return real_attention(q, k, v, backend)

    monkeypatch.setattr(layers, 'attention', spy)
    proj_in = {}
    block.proj.register_forward_pre_hook(lambda m, args: proj_in.update(x=args[0]))
    with torch.no_grad():
        block(torch.randn(n, C, 4, 4), torch.randn(n, 4))

    for j, name in enumerate('qkv'):
        t = seen[name].reshape(n, heads, Ch, 16)
        for h in range(heads):
            for c in range(Ch):
                assert torch.all(t[:, h, c] == (h * Ch + c) * 3 + j), (name, h, c)
    # With constant q/k the attention is uniform, so the output equals v, and head h channel c must
    # arrive at proj input channel h*C_head + c.
    for h in range(heads):
        for c in range(Ch):
            torch.testing.assert_close(proj_in['x'][:, h * Ch + c], torch.full((n, 4, 4), float((h * Ch + c) * 3 + 2)))


def _map_layer0_input(net, noise, **kw):
    got = {}
    handle = net.map_layer0.register_forward_pre_hook(lambda m, args: got.update(x=args[0]))
    with torch.no_grad():
        net.embed(noise, **kw)
    handle.remove()
    return got['x']


def test_song_embedding_swaps_sin_cos_and_adm_does_not():
    noise = torch.tensor([-1.3, 0.2, 0.9])
    song = SongUNet(8, 3, 3, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    half = 8
    arg = noise[:, None] * torch.tensor([(1e-4) ** (i / (half - 1)) for i in range(half)])
    torch.testing.assert_close(_map_layer0_input(song, noise), torch.cat([arg.sin(), arg.cos()], 1))

    adm = DhariwalUNet(8, 3, 3, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    arg = noise[:, None] * torch.tensor([(1e-4) ** (i / half) for i in range(half)])
    torch.testing.assert_close(_map_layer0_input(adm, noise), torch.cat([arg.cos(), arg.sin()], 1))

    fourier = SongUNet(8, 3, 3, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                       embedding_type='fourier', channel_mult_noise=2)
    arg = 2 * math.pi * noise[:, None].double() * fourier.map_noise.freqs[None, :].double()
    assert fourier.map_noise.freqs.shape == (16,)
    # |arg| reaches ~100, so fp32 rounding of the argument allows ~1e-5 differences.
    torch.testing.assert_close(_map_layer0_input(fourier, noise).double(), torch.cat([arg.sin(), arg.cos()], 1),
                               rtol=0, atol=1e-4)


def test_label_scaling_song_vs_adm():
    label_dim = 10
    onehot = F.one_hot(torch.tensor([3, 7]), label_dim).float()
    noise = torch.tensor([0.1, -0.4])

    song = SongUNet(8, 3, 3, label_dim=label_dim, model_channels=16, channel_mult=[1], num_blocks=1)
    got = {}
    song.map_label.register_forward_pre_hook(lambda m, args: got.update(x=args[0]))
    with torch.no_grad():
        song.embed(noise, onehot)
    torch.testing.assert_close(got['x'], onehot * math.sqrt(label_dim))
    assert song.map_label.bias is not None

    adm = randomize_(DhariwalUNet(8, 3, 3, label_dim=label_dim, model_channels=16, channel_mult=[1],
                                  num_blocks=1, attn_resolutions=[]), 0)
    assert adm.map_label.bias is None
    with torch.no_grad():
        pos = adm.map_noise(noise)
        expected = F.silu(adm.map_layer1(F.silu(adm.map_layer0(pos))) + onehot @ adm.map_label.weight.T)
        torch.testing.assert_close(adm.embed(noise, onehot), expected)


def test_group_norm_eps_and_groups():
    song = SongUNet(8, 3, 3, model_channels=16, channel_mult=[1], num_blocks=1)
    adm = DhariwalUNet(8, 3, 3, model_channels=16, channel_mult=[1], num_blocks=1)
    song_norms = [m for m in song.modules() if isinstance(m, layers.GroupNorm)]
    adm_norms = [m for m in adm.modules() if isinstance(m, layers.GroupNorm)]
    assert song_norms and all(m.eps == 1e-6 for m in song_norms)
    assert adm_norms and all(m.eps == 1e-5 for m in adm_norms)
    assert layers.GroupNorm(256).num_groups == 32 and layers.GroupNorm(16).num_groups == 4
    x = torch.randn(2, 16, 3, 3)
    gn = randomize_(layers.GroupNorm(16, eps=1e-6), 1)
    torch.testing.assert_close(gn(x), ref_group_norm(x, gn.weight, gn.bias, 1e-6))


@pytest.mark.parametrize('taps', [[1, 1], [1, 3, 3, 1]])
def test_resampling_conv_matches_explicit_filters(taps):
    x = torch.randn(2, 4, 8, 8)
    down = layers.Conv2d(4, 4, kernel=0, down=True, resample_filter=taps)
    up = layers.Conv2d(4, 4, kernel=0, up=True, resample_filter=taps)
    torch.testing.assert_close(down.resample_filter[0, 0], fir_taps_2d(taps, x))
    torch.testing.assert_close(down(x), ref_down(x, taps))
    torch.testing.assert_close(up(x), ref_up(x, taps))
    if taps == [1, 1]:
        # The box filter is plain average pooling / nearest-neighbour upsampling.
        torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
        torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode='nearest'))
    # Resampling happens before the convolution.
    conv = randomize_(layers.Conv2d(4, 6, kernel=3, down=True, resample_filter=taps), 2)
    expected = F.conv2d(ref_down(x, taps), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)
    conv_up = randomize_(layers.Conv2d(4, 6, kernel=3, up=True, resample_filter=taps), 3)
    torch.testing.assert_close(conv_up(x), F.conv2d(ref_up(x, taps), conv_up.weight, conv_up.bias, padding=1))
    fused = randomize_(layers.Conv2d(4, 6, kernel=3, up=True, fused_resample=True, resample_filter=taps), 4)
    assert fused(x).shape == (2, 6, 16, 16)


def test_decoder_concatenates_features_before_skip():
    """Swapping the halves of the decoder input changes the result; ours matches [x, skip]."""
    net, ref_fn, cfg = build_tiny('ddpmpp')
    first = net.dec['4x4_block0']
    seen = {}
    first.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    enc_out = {}
    net.enc['4x4_block1'].register_forward_hook(lambda m, a, out: enc_out.update(x=out))
    net.dec['4x4_in1'].register_forward_hook(lambda m, a, out: enc_out.update(h=out))
    x, sigma, labels, aug = tiny_inputs(cfg)
    with torch.no_grad():
        net(x, sigma.log() / 4, labels, augment_labels=aug)
    torch.testing.assert_close(seen['x'], torch.cat([enc_out['h'], enc_out['x']], dim=1))


# ----------------------------------------------------------------------------------------------
# Preconditioning.

class Probe(torch.nn.Module):
    """Inner-network stand-in: records its inputs and returns 2*x + 1 (a known F)."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = dict(x=x, noise=noise_labels, labels=class_labels, aug=augment_labels)
        return 2 * x + 1


def _probe(cls, **kw):
    net = cls(img_resolution=1, img_channels=2, model_type='MLPNet', model_channels=8, num_layers=1, **kw)
    net.model = Probe()
    return net


def test_edm_precond_formulas():
    net = _probe(EDMPrecond, sigma_data=0.7, label_dim=3)
    x = torch.randn(4, 2, 1, 1)
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0])
    out = net(x, sigma)
    s, sd = sigma.double().reshape(-1, 1, 1, 1), 0.7
    c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()
    c_in, c_noise = 1 / (sd ** 2 + s ** 2).sqrt(), s.log().flatten() / 4
    torch.testing.assert_close(net.model.seen['x'].double(), c_in * x.double())
    torch.testing.assert_close(net.model.seen['noise'].double(), c_noise)
    torch.testing.assert_close(out.double(), c_skip * x.double() + c_out * (2 * c_in * x.double() + 1))
    # Missing labels become one zero row; a scalar sigma broadcasts.
    assert torch.equal(net.model.seen['labels'], torch.zeros(1, 3))
    assert net(x, 0.5).shape == x.shape


def test_vp_and_ve_precond_formulas():
    x = torch.randn(3, 2, 1, 1)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    s = sigma.double().reshape(-1, 1, 1, 1)

    vp = _probe(VPPrecond)
    out = vp(x, sigma)
    beta_d, beta_min = 19.9, 0.1
    t = ((beta_min ** 2 + 2 * beta_d * torch.log1p(s ** 2)).sqrt() - beta_min) / beta_d
    c_in = 1 / (s ** 2 + 1).sqrt()
    # (fp32 evaluation of log(1 + sigma^2) limits the agreement at small sigma, as in EDM)
    torch.testing.assert_close(vp.model.seen['noise'].double(), 999 * t.flatten(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out.double(), x.double() - s * (2 * c_in * x.double() + 1))
    # sigma(t) and sigma_inv are inverse; the range is sigma(eps_t) .. sigma(1).
    torch.testing.assert_close(vp.sigma(vp.sigma_inv(sigma)), sigma, rtol=1e-4, atol=1e-6)
    # EDM evaluates sigma(eps_t) in fp32, where exp(1e-6) - 1 loses digits (it gives 2^-10, not 1.0005e-3).
    assert vp.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * beta_d * 1e-10 + beta_min * 1e-5)), rel=0.05)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * beta_d + beta_min)), rel=1e-5)

    ve = _probe(VEPrecond)
    out = ve(x, sigma)
    torch.testing.assert_close(ve.model.seen['x'], x)
    torch.testing.assert_close(ve.model.seen['noise'].double(), torch.log(0.5 * s).flatten())
    torch.testing.assert_close(out.double(), x.double() + s * (2 * x.double() + 1))
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)


def test_init_kwargs_round_trip_and_build_network():
    net = EDMPrecond(16, 3, label_dim=4, model_type='SongUNet', model_channels=16, channel_mult=(1, 2),
                     num_blocks=1, attn_resolutions=[8], augment_dim=9).eval()
    kw = json.loads(json.dumps(net.init_kwargs))
    # Exactly the passed arguments (positional ones by name), tuples as lists, no unpassed defaults.
    assert kw == dict(img_resolution=16, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16,
                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9)
    clone = build_network('EDMPrecond', kw).eval()
    clone.load_state_dict(net.state_dict(), strict=True)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    labels = F.one_hot(torch.tensor([0, 2]), 4).float()
    with torch.no_grad():
        torch.testing.assert_close(clone(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
    assert set(PRECOND_TYPES) == {'EDMPrecond', 'VPPrecond', 'VEPrecond'}
    assert set(MODEL_TYPES) == {'SongUNet', 'DhariwalUNet', 'MLPNet'}
    assert build_network('VEPrecond', dict(img_resolution=8, img_channels=1, model_channels=16,
                                           channel_mult=[1], num_blocks=1)).init_kwargs['img_resolution'] == 8


def test_refusals():
    with pytest.raises(ValueError, match='model_type'):
        EDMPrecond(8, 3, model_type='NoSuchNet')
    with pytest.raises(ValueError, match='network class'):
        build_network('iDDPMPrecond', {})
    with pytest.raises(ValueError, match='encoder_type'):
        SongUNet(8, 3, 3, encoder_type='bogus')
    with pytest.raises(ValueError, match='backend'):
        set_attention_backend(torch.nn.Linear(1, 1), 'flash')


# ----------------------------------------------------------------------------------------------
# Precision and performance options.

@pytest.mark.parametrize('key', ['ddpmpp', 'adm'])
def test_sdpa_backend_equals_math(key):
    net, _, cfg = build_tiny(key)
    x, sigma, labels, aug = tiny_inputs(cfg)
    noise = sigma.log() / 4
    with torch.no_grad():
        math_out = net(x, noise, labels, augment_labels=aug)
        set_attention_backend(net, 'sdpa')
        assert all(m.attn_backend == 'sdpa' for m in net.modules() if isinstance(m, layers.UNetBlock))
        sdpa_out = net(x, noise, labels, augment_labels=aug)
    torch.testing.assert_close(sdpa_out, math_out, rtol=1e-5, atol=1e-5)
    # Gradients agree too.
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for backend, xi in zip(['math', 'sdpa'], xs):
        set_attention_backend(net, backend)
        net(xi, noise, labels, augment_labels=aug).square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)


def test_default_attention_backend_applies_to_new_blocks():
    assert nets.get_default_attention_backend() == 'sdpa'
    nets.set_default_attention_backend('math')
    try:
        block = layers.UNetBlock(8, 8, 4, attention=True, num_heads=1)
        assert block.attn_backend == 'math'
    finally:
        nets.set_default_attention_backend('sdpa')


@pytest.mark.parametrize('key', ['ncsnpp', 'adm'])
def test_channels_last_equals_contiguous(key):
    net, _, cfg = build_tiny(key)
    x, sigma, labels, aug = tiny_inputs(cfg)
    noise = sigma.log() / 4
    with torch.no_grad():
        expected = net(x, noise, labels, augment_labels=aug)
        net = net.to(memory_format=torch.channels_last)
        got = net(x.contiguous(memory_format=torch.channels_last), noise, labels, augment_labels=aug)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _tiny_precond(use_fp16):
    """The tiny DDPM++ network of TINY inside EDMPrecond (random weights, so every layer matters)."""
    inner, _, cfg = build_tiny('ddpmpp')
    kwargs = {k: v for k, v in cfg.items() if k not in ('in_channels', 'out_channels')}
    net = EDMPrecond(img_channels=3, model_type='SongUNet', use_fp16=use_fp16, **kwargs).eval()
    net.model.load_state_dict(inner.state_dict())
    return net, tiny_inputs(cfg)


def test_compute_dtype_follows_set_precision():
    net, _ = _tiny_precond(use_fp16=True)
    plain, _ = _tiny_precond(use_fp16=False)
    # Never set: EDM's default, fp16 on CUDA only and only when built with use_fp16.
    assert net.precision is None and plain.precision is None
    assert net.compute_dtype('cpu') == torch.float32 and net.compute_dtype('cuda') == torch.float16
    assert plain.compute_dtype('cuda') == torch.float32
    expected = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
    for precision, dtype in expected.items():
        for m in (net, plain):
            assert set_precision(m, precision) is m and m.precision == precision
            # The setting wins over use_fp16 and over the device: 'fp32' is full precision even on CUDA.
            assert m.compute_dtype('cpu') == dtype and m.compute_dtype('cuda') == dtype
            assert m.compute_dtype('cuda', force_fp32=True) == torch.float32   # EDM's argument keeps its meaning
    set_precision(net, None)
    assert net.compute_dtype('cuda') == torch.float16


def _dtypes_seen(net, x, sigma, labels):
    """{module kind: set of (input dtype, autocast on)} over one forward."""
    seen = {}

    def hook(kind):
        return lambda m, args: seen.setdefault(kind, set()).add((args[0].dtype, torch.is_autocast_enabled('cpu')))
    hooks = []
    for name, m in net.model.named_modules():
        kind = ('mapping' if name.startswith('map_') or name.endswith('affine') else
                type(m).__name__ if isinstance(m, (layers.Conv2d, layers.GroupNorm)) else None)
        if kind:
            hooks.append(m.register_forward_pre_hook(hook(kind)))
    with torch.no_grad():
        out = net(x, sigma, labels)
    for h in hooks:
        h.remove()
    return seen, out


def test_fp16_precision_casts_as_edm_use_fp16():
    """EDM's use_fp16 (training/networks.py): the wrapper casts c_in x to fp16, so every convolution and group norm
    of the U-Net runs on fp16 activations, while the mapping network (embeddings, the blocks' affine layers) sees
    the fp32 noise labels; no autocast anywhere; the result is fp32 and close to the fp32 one."""
    net, (x, sigma, labels, _) = _tiny_precond(use_fp16=False)
    fp32 = set_precision(net, 'fp32')(x, sigma, labels)
    seen, out = _dtypes_seen(set_precision(net, 'fp16'), x, sigma, labels)
    assert seen == {'Conv2d': {(torch.float16, False)}, 'GroupNorm': {(torch.float16, False)},
                    'mapping': {(torch.float32, False)}}
    assert out.dtype == torch.float32
    assert 0 < (out - fp32).abs().max() < 1e-2 * fp32.abs().max()
    seen, _ = _dtypes_seen(set_precision(net, 'bf16'), x, sigma, labels)   # bf16: autocast, fp32 inputs
    assert all(autocast for kind in seen.values() for _, autocast in kind)


def test_set_precision_reaches_every_wrapper_and_refuses_unknown_names():
    a, _ = _tiny_precond(use_fp16=False)
    b = EDMPrecond(img_resolution=1, img_channels=2, model_type='MLPNet', model_channels=8, num_layers=1)
    other = torch.nn.Linear(2, 2)
    holder = torch.nn.ModuleDict({'a': a, 'b': b, 'other': other})
    assert set_precision(holder, 'bf16') is holder
    assert a.precision == b.precision == 'bf16' and not hasattr(other, 'precision')
    for bad in ('int8', 'float32', 'BF16'):
        with pytest.raises(ValueError, match='precision'):
            set_precision(holder, bad)
    assert a.precision == b.precision == 'bf16'   # a refused name changes nothing


def test_fp32_precision_of_a_use_fp16_network_is_bitwise_the_default_on_cpu():
    net, (x, sigma, labels, _) = _tiny_precond(use_fp16=True)
    plain, _ = _tiny_precond(use_fp16=False)
    with torch.no_grad():
        default = net(x, sigma, labels)
        set_precision(net, 'fp32')
        fp32 = net(x, sigma, labels)
        reference = plain(x, sigma, labels)   # the same weights built without use_fp16
    assert fp32.dtype == torch.float32
    assert torch.equal(fp32, default) and torch.equal(fp32, reference)


def test_bf16_precision_differs_from_fp32_but_is_close():
    net, (x, sigma, labels, _) = _tiny_precond(use_fp16=False)
    with torch.no_grad():
        fp32 = set_precision(net, 'fp32')(x, sigma, labels)
        bf16 = set_precision(net, 'bf16')(x, sigma, labels)
        forced = net(x, sigma, labels, force_fp32=True)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()   # the wrapper returns fp32 either way
    assert not torch.equal(bf16, fp32)                                 # it really ran in reduced precision
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()
    assert torch.equal(forced, fp32)


def test_attention_softmax_stays_fp32_under_autocast():
    q = torch.randn(2, 4, 6, dtype=torch.bfloat16) * 30
    k = torch.randn(2, 4, 6, dtype=torch.bfloat16) * 30
    v = torch.randn(2, 4, 6, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        a = layers.attention(q, k, v)
    w = torch.softmax(q.double().transpose(1, 2) @ k.double() / 2, dim=-1)
    expected = v.double() @ w.to(torch.bfloat16).double().transpose(1, 2)
    torch.testing.assert_close(a.double(), expected, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------
# MLPNet (low-dimensional data).

def test_mlpnet_in_edm_precond():
    net = EDMPrecond(img_resolution=1, img_channels=2, model_type='MLPNet', model_channels=32, num_layers=3,
                     label_dim=3, augment_dim=2)
    assert isinstance(net.model, MLPNet)
    x = torch.randn(5, 2, 1, 1)
    sigma = torch.rand(5) * 3 + 0.01
    labels = F.one_hot(torch.arange(5) % 3, 3).float()
    out = net(x, sigma, labels, augment_labels=torch.randn(5, 2))
    assert out.shape == x.shape and out.dtype == torch.float32
    # Fresh networks start as D(x) ~= c_skip x (near-zero output layer).
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(out, c_skip.reshape(-1, 1, 1, 1) * x, rtol=1e-3, atol=1e-3)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # Works for R > 1 too (features are flattened), and with a Fourier embedding.
    net2 = EDMPrecond(img_resolution=2, img_channels=1, model_type='MLPNet', model_channels=16, num_layers=1,
                      embedding_type='fourier')
    assert net2(torch.randn(3, 1, 2, 2), torch.ones(3)).shape == (3, 1, 2, 2)


def test_mlpnet_fits_a_point_mass():
    """A few Adam steps reduce the EDM denoising loss for data concentrated at one point."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=1, img_channels=2, model_type='MLPNet', model_channels=32, num_layers=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    y = torch.tensor([0.8, -0.6]).reshape(1, 2, 1, 1).expand(256, 2, 1, 1)

    def loss():
        sigma = torch.exp(torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(1)) * 1.2 - 1.2)
        n = torch.randn(256, 2, 1, 1, generator=torch.Generator().manual_seed(2)) * sigma
        w = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        return (w * (net(y + n, sigma) - y) ** 2).mean()

    start = loss().item()
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.3 * start


def test_label_dropout_zeroes_whole_rows_only_in_training():
    from sidlib.networks.layers import drop_labels

    labels = torch.nn.functional.one_hot(torch.arange(400) % 10, 10).float()
    assert torch.equal(drop_labels(labels, 0.5, training=False), labels)
    assert torch.equal(drop_labels(labels, 0.0, training=True), labels)
    assert not drop_labels(labels, 1.0, training=True).any()
    torch.manual_seed(0)
    out = drop_labels(labels, 0.5, training=True)
    kept = out.sum(1)
    assert set(kept.tolist()) <= {0.0, 1.0} and torch.equal(out[kept == 1], labels[kept == 1])
    assert 0.35 < 1 - kept.mean().item() < 0.65
