"""flashfx.zoo: every tiny model runs and trains, matches Hugging Face's implementation of its architecture,
the real sizes have the published parameter counts, and every kind of bad spec fails with a clear ValueError."""
import re
import textwrap

import pytest
import torch
import torch.nn as nn

from flashfx import zoo
from flashfx.rewriter.capture import capture
from models import HF_ARCHS, TINY_ZOO, hf_model  # tests/models.py (tests/ is on sys.path via conftest.py)

transformers = pytest.importorskip("transformers")

OUT_SHAPE = {"gpt2-tiny": (2, 16, 512), "llama-tiny": (2, 16, 512), "bert-tiny": (2, 16, 512), "vit-tiny": (2, 10)}


# ---------------------------------------------------------------- zoo models run, train, are deterministic

@pytest.mark.parametrize("name", TINY_ZOO)
def test_tiny_forward_backward(name):
    model, inputs = zoo.build(name)
    assert not model.training
    logits = model(**inputs)
    assert logits.shape == OUT_SHAPE[name] and torch.isfinite(logits).all()

    model, inputs = zoo.build(name, labels=True)
    loss = model(**inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # Random init: the loss is near the uniform-prediction loss log(classes).
    assert abs(loss.item() - torch.log(torch.tensor(float(logits.shape[-1]))).item()) < 0.5
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", TINY_ZOO)
def test_deterministic_by_seed(name):
    (m1, in1), (m2, in2), (m3, in3) = zoo.build(name), zoo.build(name), zoo.build(name, seed=1)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(in1[k], in2[k]) for k in in1)
    assert torch.equal(m1(**in1), m2(**in2))
    assert not torch.equal(m1(**in1), m3(**in3))


def test_build_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    zoo.build("llama-tiny")
    assert torch.equal(before, torch.get_rng_state())


def test_norm_weights_and_biases_are_not_ones_and_zeros():
    model, _ = zoo.build("gpt2-tiny")
    assert not torch.all(model.ln_f.weight == 1) and not torch.all(model.h[0].c_fc.bias == 0)
    model, _ = hf_model("LlamaForCausalLM")
    assert not torch.all(model.model.norm.weight == 1)


@pytest.mark.parametrize("name,batch,seq", [("llama-tiny", 3, 7), ("gpt2-tiny", 1, 1024), ("bert-tiny", 4, 5)])
def test_batch_and_seq(name, batch, seq):
    model, inputs = zoo.build(name, batch=batch, seq=seq)
    assert inputs["input_ids"].shape == (batch, seq)
    assert model(**inputs).shape == (batch, seq, 512)


def test_bert_inputs_are_padded_and_the_mask_matters():
    model, inputs = zoo.build("bert-tiny", batch=3)
    mask = inputs["attention_mask"]
    assert mask[0].all() and not mask[1:].all()
    unmasked = model(input_ids=inputs["input_ids"])
    assert not torch.allclose(model(**inputs)[1:], unmasked[1:])


def test_vit_seq_is_patches():
    model, inputs = zoo.build("vit-tiny", seq=64)
    assert model.config.image_size == 64 and inputs["pixel_values"].shape == (2, 3, 64, 64)
    assert model(**inputs).shape == (2, 10)


def test_dtype_and_size_overrides():
    model, inputs = zoo.build("llama-tiny", dtype="bf16", hidden_size=32, num_hidden_layers=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and len(model.layers) == 1
    assert model(**inputs).dtype == torch.bfloat16
    model, inputs = zoo.build("vit-tiny", dtype=torch.float16)
    assert inputs["pixel_values"].dtype == torch.float16


def test_example_inputs_for_a_built_model():
    model, _ = zoo.build("gpt2-tiny")
    inputs = zoo.example_inputs(model, batch=3, seq=9, labels=True, seed=5)
    assert inputs["input_ids"].shape == (3, 9) and torch.equal(inputs["labels"], inputs["input_ids"])
    assert model(**inputs).dim() == 0


@pytest.mark.parametrize("name", TINY_ZOO)
def test_captures_as_one_graph_with_symbolic_sizes(name):
    model, inputs = zoo.build(name)
    graphs = capture(model, (), inputs)
    assert len(graphs) == 1  # no graph breaks: the passes see the whole model
    assert {"B", "S"} <= {str(s) for s in graphs[0].symbol_names.values()} or name == "vit-tiny"


def test_list_models():
    names = [n for n, _ in zoo.list_models()]
    assert names == list(zoo.MODELS)
    for tiny in TINY_ZOO:
        assert tiny in names and tiny.removesuffix("-tiny") in names
    assert all(desc for _, desc in zoo.list_models())


# ---------------------------------------------------------------- same math and sizes as Hugging Face's models

def _hf_twin(name, model):
    """The Hugging Face model of the same architecture and config, with `model`'s weights copied in."""
    c, sd = model.config, model.state_dict()
    T = transformers
    if name == "gpt2-tiny":
        hf = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_position_embeddings,
                                            n_embd=c.hidden_size, n_layer=c.num_hidden_layers,
                                            n_head=c.num_attention_heads, bos_token_id=None, eos_token_id=None,
                                            attn_implementation="eager"))
        new = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
               "lm_head.weight": sd["wte.weight"]}
        for k, v in sd.items():
            if k.startswith("lm_head"):
                continue
            k = k.replace(".attn.c_", ".attn.C_").replace(".c_fc", ".mlp.c_fc").replace(".c_proj", ".mlp.c_proj")
            k = "transformer." + k.replace(".attn.C_", ".attn.c_")
            new.setdefault(k, v.t() if v.dim() == 2 and ".h." in k else v)  # GPT-2's Conv1D stores W transposed
    elif name == "llama-tiny":
        hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                              intermediate_size=c.intermediate_size,
                                              num_hidden_layers=c.num_hidden_layers,
                                              num_attention_heads=c.num_attention_heads,
                                              num_key_value_heads=c.num_key_value_heads,
                                              rms_norm_eps=c.rms_norm_eps, attn_implementation="eager"))
        new = {}
        for k, v in sd.items():
            k = re.sub(r"\.(gate|up|down)_proj", r".mlp.\1_proj", k)
            new[k if k.startswith("lm_head") else "model." + k] = v
    elif name == "bert-tiny":
        hf = T.BertForMaskedLM(T.BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                            intermediate_size=c.intermediate_size,
                                            num_hidden_layers=c.num_hidden_layers,
                                            num_attention_heads=c.num_attention_heads, attn_implementation="eager"))
        emb = "bert.embeddings."
        names = {"word_embeddings": emb + "word_embeddings", "position_embeddings": emb + "position_embeddings",
                 "token_type_embeddings": emb + "token_type_embeddings", "embed_norm": emb + "LayerNorm",
                 "head_transform": "cls.predictions.transform.dense",
                 "head_norm": "cls.predictions.transform.LayerNorm", "decoder": "cls.predictions.decoder",
                 "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "intermediate": "intermediate.dense", "output": "output.dense", "output_norm": "output.LayerNorm"}
        new = {}
        for k, v in sd.items():
            *mod, leaf = k.split(".")
            prefix = f"bert.encoder.layer.{mod[1]}." if mod[0] == "layers" else ""
            new[prefix + names[mod[-1]] + "." + leaf] = v
        new["cls.predictions.bias"] = sd["decoder.bias"]
    else:
        hf = T.ViTForImageClassification(T.ViTConfig(image_size=c.image_size, patch_size=c.patch_size,
                                                     hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                                     num_hidden_layers=c.num_hidden_layers,
                                                     num_attention_heads=c.num_attention_heads,
                                                     num_labels=c.num_labels, attn_implementation="eager"))
        new = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
               "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.weight"],
               "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.bias"],
               "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
               "classifier.weight": sd["classifier.weight"], "classifier.bias": sd["classifier.bias"]}
        layer = {"norm1": "layernorm_before", "proj": "attention.o_proj", "norm2": "layernorm_after",
                 "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        for i in range(c.num_hidden_layers):
            p = f"vit.layers.{i}."
            for leaf in ("weight", "bias"):
                for qkv, part in zip("qkv", sd[f"layers.{i}.qkv.{leaf}"].chunk(3)):
                    new[f"{p}attention.{qkv}_proj.{leaf}"] = part
                for mine, theirs in layer.items():
                    new[f"{p}{theirs}.{leaf}"] = sd[f"layers.{i}.{mine}.{leaf}"]
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return hf.eval()


@pytest.mark.parametrize("name", TINY_ZOO)
def test_same_outputs_and_loss_as_hugging_face(name):
    model, inputs = zoo.build(name, labels=True)
    hf = _hf_twin(name, model)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    ours, theirs = model(**no_labels), hf(**no_labels).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(**inputs), hf(**inputs).loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,hf_cls,config", [
    ("gpt2", "GPT2LMHeadModel", {}),
    ("llama", "LlamaForCausalLM", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                                       num_attention_heads=16, num_key_value_heads=4, vocab_size=128256)),
    ("bert", "BertForMaskedLM", {}),
    ("vit", "ViTForImageClassification", dict(num_labels=1000)),
])
def test_real_sizes_have_the_reference_parameter_count(name, hf_cls, config):
    model, inputs = zoo.build(name, device="meta")
    assert inputs == {}
    cls = getattr(transformers, hf_cls)
    with torch.device("meta"):
        reference = cls(cls.config_class(**config))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


# ---------------------------------------------------------------- load: hf:Arch

@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_models_run_and_attention_implementations_agree(arch):
    eager, inputs = hf_model(arch, attn_implementation="eager")
    sdpa, inputs2 = hf_model(arch, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    assert all(torch.equal(inputs[k], inputs2[k]) for k in inputs)
    out_e, out_s = eager(**inputs), sdpa(**inputs)
    key = "logits" if "logits" in out_e else "last_hidden_state"
    assert torch.isfinite(out_e[key]).all()
    torch.testing.assert_close(out_e[key], out_s[key], rtol=1e-4, atol=1e-5)
    assert eager.config.num_hidden_layers == 2 and eager.config.hidden_size == 64


def test_hf_load_sizes_labels_and_seq():
    model, inputs = zoo.load("hf:LlamaForCausalLM", batch=3, seq=9, labels=True, hidden_size=32)
    assert model.config.hidden_size == 32 and model.config.head_dim == 8
    assert inputs["input_ids"].shape == (3, 9)
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    model, inputs = zoo.load("hf:GPT2LMHeadModel", seq=600)  # longer than the small default: positions grow
    assert model.config.n_positions == 600 and model(**inputs).logits.shape == (2, 600, 512)
    model, inputs = zoo.load("hf:ViTModel", seq=64)
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    model, inputs = zoo.load("hf:BertForMaskedLM", labels=True)
    assert (inputs["labels"] != -100).any() and torch.isfinite(model(**inputs).loss)


# ---------------------------------------------------------------- load: path/to/file.py:factory

FACTORIES = '''
import torch
from flashfx import zoo

def with_inputs(batch=2, seq=4):
    model = torch.nn.Linear(seq, 3)
    return model, {"input": torch.randn(batch, seq)}

def zoo_model_only():
    return zoo.build("gpt2-tiny")[0]

def linear_only():
    return torch.nn.Linear(4, 4)

def positional_inputs():
    return torch.nn.Linear(4, 4), (torch.randn(2, 4),)

def not_a_model():
    return 42
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(textwrap.dedent(FACTORIES))
    return str(path)


def test_file_factory(factory_file):
    model, inputs = zoo.load(f"{factory_file}:with_inputs", batch=5, seq=6)
    assert inputs["input"].shape == (5, 6) and model(**inputs).shape == (5, 3)
    model, inputs = zoo.load(f"{factory_file}:with_inputs", dtype="fp16")
    assert model.weight.dtype == torch.float16 and inputs["input"].dtype == torch.float16
    model, inputs = zoo.load(f"{factory_file}:zoo_model_only", batch=3, seq=5)
    assert model(**inputs).shape == (3, 5, 512)
    model, inputs = zoo.load(f"{factory_file}:positional_inputs")
    assert set(inputs) == {"input"} and model(**inputs).shape == (2, 4)


# ---------------------------------------------------------------- bad specs: one-line ValueErrors that say the fix

@pytest.mark.parametrize("spec,kwargs,message", [
    ("lama-tiny", {}, "did you mean 'llama-tiny'"),
    ("LlamaForCausalLM", {}, "write 'hf:LlamaForCausalLM'"),
    ("resnet", {}, "use a zoo name"),
    ("", {}, "non-empty string"),
    ("hf:LlamaForCausalLMM", {}, "did you mean 'hf:LlamaForCausalLM'"),
    ("hf:not_a_model", {}, "unknown Hugging Face architecture"),
    ("hf:BertModel", {"hiden_size": 8}, "did you mean 'hidden_size'"),
    ("hf:BertModel", {"labels": True}, "takes no labels"),
    ("hf:ViTModel", {"seq": 10}, "must be a square"),
    ("hf:GPT2LMHeadModel", {"seq": 100, "max_position_embeddings": 64}, "longer than"),
    ("missing_dir/nope.py:make", {}, "does not exist"),
    ("llama-tiny", {"batch": 0}, "batch must be a positive integer, got 0"),
    ("llama-tiny", {"batch": "4"}, "batch must be a positive integer, got '4'"),
    ("llama-tiny", {"batch": True}, "batch must be a positive integer"),
    ("gpt2-tiny", {"seq": -3}, "seq must be a positive integer, got -3"),
    ("gpt2-tiny", {"seq": 2.5}, "seq must be a positive integer"),
    ("gpt2-tiny", {"seq": 2048}, "max_position_embeddings=2048"),
    ("gpt2-tiny", {"seq": 1, "labels": True}, "seq >= 2"),
    ("vit-tiny", {"seq": 15}, "must be a square"),
    ("vit-tiny", {"seq": 16, "image_size": 64}, "disagree"),
    ("llama-tiny", {"hidden": 8}, "did you mean 'hidden_size'"),
    ("llama-tiny", {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ("bert-tiny", {"hidden_size": 30}, "not divisible by num_attention_heads"),
    ("bert-tiny", {"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ("bert-tiny", {"dropout": 1.5}, "dropout must be in [0, 1)"),
    ("llama-tiny", {"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ("llama-tiny", {"attn_implementation": "sdpa"}, "applies to 'hf:' specs only"),
])
def test_bad_specs(spec, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        zoo.load(spec, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix,message", [
    ("", "names no factory; write it as"),
    (":make_modle", "has no function 'make_modle'"),
    (":with_input", "did you mean"),
    (":my-factory", "is not a function name"),
    (":linear_only", "cannot guess what it takes; return (model, inputs)"),
    (":not_a_model", "returned int; it must return an nn.Module"),
])
def test_bad_file_specs(factory_file, suffix, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        zoo.load(factory_file + suffix)


def test_factory_that_cannot_take_the_requested_size(factory_file):
    with pytest.raises(ValueError, match=re.escape("takes no 'batch' argument; add a `batch` parameter")):
        zoo.load(f"{factory_file}:positional_inputs", batch=4)
    with pytest.raises(ValueError, match=re.escape("takes no 'hidden_size' argument")):
        zoo.load(f"{factory_file}:zoo_model_only", hidden_size=32)


def test_example_inputs_rejects_other_models():
    with pytest.raises(ValueError, match="needs a flashfx.zoo model"):
        zoo.example_inputs(nn.Linear(2, 2), batch=2, seq=2)
