"""A tiny random-initialised Qwen2.5-VL with an offline word-level tokenizer and processor (no download)."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor


def special(name: str) -> str:
    """Qwen's spelling of a special token: the name between `<|` and `|>`."""
    return f"<|{name}|>"


PAD, EOS = special("endoftext"), special("im_end")
CONTROL_TOKENS = [PAD, special("im_start"), EOS,
                  *map(special, ("vision_start", "vision_end", "image_pad", "video_pad"))]
UNK = "[UNK]"  # this word-level vocabulary's own unknown token
WORDS = ["user", "assistant", "Yes", "No", "yes", "no", "a", "an", "photo", "of", "seven", "thick", "3", "score",
         "{", "}", ":", '"', ",", ".", "?", "json", "```", "Is", "Does", "this", "image", "show", "Answer", "or",
         "real", "free", "strange", "features"]
# Qwen's chat layout, shortened: a user turn with its content items in order, then the assistant's turn opens
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_processor() -> Qwen2_5_VLProcessor:
    vocab = {token: i for i, token in enumerate(CONTROL_TOKENS + WORDS + [UNK])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=UNK, pad_token=PAD, eos_token=EOS,
                                      additional_special_tokens=CONTROL_TOKENS[1:])
    # 4-pixel patches merged 2 x 2: a 16 x 16 image is 16 patches, 4 image tokens
    sizes = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    images = Qwen2VLImageProcessor(**sizes, min_pixels=16 * 16, max_pixels=32 * 32)
    return Qwen2_5_VLProcessor(image_processor=images, tokenizer=wrapped,
                               video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE)


def tiny_qwen_vl(processor: Qwen2_5_VLProcessor, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    ids = processor.tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4},
                         pad_token_id=ids(PAD), eos_token_id=ids(EOS), bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, window_size=16,
                           fullatt_block_indexes=[1]),
        image_token_id=ids(special("image_pad")), video_token_id=ids(special("video_pad")),
        vision_start_token_id=ids(special("vision_start")), vision_end_token_id=ids(special("vision_end")),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()
