"""The parameter shapes of three real models, written out from their architectures (nothing is
downloaded), so that the step-time benchmark can step a real model's tensor list: a few large
matrices among many small biases and norms, in the order the models register them.

    gpt2-small  124,439,808 params in 148 tensors (Hugging Face GPT2Model; lm_head is tied to wte)
    bert-base   109,482,240 params in 199 tensors (Hugging Face BertModel, with its pooler)
    resnet50     25,557,032 params in 161 tensors (torchvision resnet50, 1000 classes)
"""

from __future__ import annotations

import math

Shape = tuple[int, ...]


def gpt2_small(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024
               ) -> list[Shape]:
    shapes = [(vocab, width), (context, width)]  # token and position embeddings
    for _ in range(layers):
        shapes += [
            (width,), (width,),  # ln_1
            (width, 3 * width), (3 * width,),  # attn.c_attn (Conv1D: in x out)
            (width, width), (width,),  # attn.c_proj
            (width,), (width,),  # ln_2
            (width, 4 * width), (4 * width,),  # mlp.c_fc
            (4 * width, width), (width,),  # mlp.c_proj
        ]
    return shapes + [(width,), (width,)]  # ln_f


def bert_base(layers: int = 12, width: int = 768, vocab: int = 30522, positions: int = 512
              ) -> list[Shape]:
    shapes = [(vocab, width), (positions, width), (2, width), (width,), (width,)]  # embeddings
    for _ in range(layers):
        shapes += [(width, width), (width,)] * 3  # query, key, value
        shapes += [(width, width), (width,), (width,), (width,)]  # attention output + LayerNorm
        shapes += [(4 * width, width), (4 * width,)]  # intermediate
        shapes += [(width, 4 * width), (width,), (width,), (width,)]  # output + LayerNorm
    return shapes + [(width, width), (width,)]  # pooler


def resnet50(classes: int = 1000) -> list[Shape]:
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    in_channels = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):  # bottleneck: 1x1, 3x3, 1x1 convs, each with a batch norm
            shapes += [(planes, in_channels, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (4 * planes, planes, 1, 1), (4 * planes,), (4 * planes,)]
            if block == 0:  # the downsample branch: 1x1 conv + batch norm
                shapes += [(4 * planes, in_channels, 1, 1), (4 * planes,), (4 * planes,)]
            in_channels = 4 * planes
    return shapes + [(classes, in_channels), (classes,)]  # fc


MODELS = {"gpt2-small": gpt2_small, "bert-base": bert_base, "resnet50": resnet50}


def param_count(shapes: list[Shape]) -> int:
    return sum(math.prod(shape) for shape in shapes)
