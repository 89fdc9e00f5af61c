"""The decoders' fixed cost per step, cut once offline: a leaner copy of optimum's decoder graphs, cached.

A decoder step of whisper-base runs ~400 ONNX nodes, ~340 of them on the CPU EP around the XDNA EP's GEMMs:
optimum's export recomputes every Reshape target from Shape -> Gather -> Unsqueeze -> Concat chains at run time,
and slices the causal mask to the cache length in every layer. Each node costs ORT a few microseconds however
small its tensor. The copy built here computes the same numbers (bit for bit: no arithmetic is changed, moved or
reordered) with ~120 fewer nodes:

1. Shapes proven instead of computed. Symbolic shape inference (onnxruntime.tools.symbolic_shape_infer) names
   every dimension. A Reshape target becomes a constant: a dimension's number when it is one, 0 ("copy the
   input's dimension") when it is provably the input's dimension at that position, -1 for the one remaining
   dimension; Reshapes where that is not proven are left alone. A Reshape to its input's shape, and a Slice with
   steps of 1 whose result has its input's shape, are dropped. The shape chains that only fed them are then dead
   and removed.
2. Duplicates merged: nodes of one deterministic op with equal attributes and equal inputs (small constants
   compared by value), e.g. the six layers' identical mask Where, run once.

Not done, because it is not bit-exact: onnxruntime.transformers' SkipLayerNormalization fusion (its kernel rounds
the residual sum and the normalisation differently from Add + LayerNormalization; measured no faster either).
Every MatMul stays as it was, so the XDNA EP claims exactly what it claimed before.

3. decoder_model only (`logits_rows`): the logits of the prompt positions the caller asks for, not of all of
   them. A new input `xdna_logits_rows` (int64 positions) Gathers the final hidden states in front of the
   vocabulary projection (512 x 51865 for whisper-base: 53 MFLOP per row). The search needs two rows of a prompt
   (<|startoftranscript|> for the no-speech probability, and the last), and a window after the first has a prompt
   of up to 224 previous tokens: ~100 rows of logits (and 20 MB of output) computed and dropped per window. Each
   row of a MatMul is computed alone (row-independent kernels; int8 quantises A per row), so the rows kept have
   the same bits.
4. For the XDNA EP only (`bf16_cross_kv`, a copy of its own): the cross-attention K/V in bfloat16. decoder_model
   casts its `present.N.encoder.*` outputs to bf16 and decoder_with_past takes `past_key_values.N.encoder.*` as
   bf16, with a Cast back to float in front of the attention. The EP's fused attention claims the Cast with the
   attention and reads the bf16 K/V as they lie: its contract rounds K and V to bf16 (nearest even, as ORT's Cast
   does) as it reads them, so the results are bit for bit today's, and every step reads half the bytes (37 MB ->
   18 MB per step for whisper-base). Where the EP leaves an attention to the CPU EP, the Cast runs there and the
   CPU's MatMul sees K and V rounded to bf16 (an fp32 path then loses exactness: never used for the CPU EP or the
   bf16x3 policy).

5. With pass 4, decoder_model only (`cast_before_head_split`): a cross K/V output whose head-split Transpose
   feeds nothing but its bf16 Cast (the keys: the attention reads K through a Transpose of its own) is cast
   before the Transpose instead of after it, so that Transpose moves bf16, half the bytes (six 1500 x 512
   Transposes per window for whisper-base). Cast is elementwise and Transpose moves values: the same bits.
   The values' head split is also the attention's V and stays fp32: casting it first too would let the EP read V
   through a Transpose (1 KB-strided rows), which measured slower in its attention than the copy it saves. Tried
   and not kept either: K/V handed to decoder_with_past frames-first ([batch, frames, heads, dim]), read
   through a Transpose every step: steps measured slower than the per-window Transposes it saves.

8. With pass 4, decoder_model only (`cast_at_projection`; after pass 5): each cross K/V output's Cast to bf16 moved
   up to the projection's output, ahead of the Reshape / Transposes of its head split (which then move bf16), so
   that the EP's MatMul takes the Cast and writes its product in bf16 (ops/matmul.cc: the same rounding as ORT's
   Cast, kernels/gemm_contract.h "Output in bfloat16"): no CPU Cast of 1500 x 512 per layer and per K/V each
   window. The attention's own reads of the projection (K^T through a Transpose, V through the head split) then
   take the bf16 tensor through a Cast back to float, as decoder_with_past's do (pass 4): the EP's fused attention
   claims that Cast and rounds K and V to bf16 as it reads them anyway, so the logits keep their bits. Cast is
   elementwise and Reshape / Transpose move values: the outputs' bits are those of pass 5.

6. Broadcasts the reader makes anyway (`drop_absorbed_broadcasts`): a Tile or Expand whose every use reaches,
   through elementwise ops and Gathers indexed by it, an Add (Sub, Mul, ...) whose other operand alone has the
   result's shape. optimum's export tiles the position ids over the batch before their embedding is added to
   the tokens', and expands the causal mask to [batch, 1, q, k] before every layer adds it to its scores; the
   Adds broadcast by themselves, so the Tile, the Expands and the shape work computing their repeats (~25 nodes
   per step) go.

7. With pass 4 (`bf16_self_kv`, in the same copy): the self-attention cache in bfloat16 too. decoder_model's
   `present.N.decoder.*` outputs and decoder_with_past's `past_key_values.N.decoder.*` inputs and
   `present.N.decoder.*` outputs become bf16: the new token's K/V are cast to bf16 before the Concat and the
   Concat's result is cast back to float for its readers, a Cast the EP's MatMul claims with the product and reads
   through (ops/transpose_fusion.h): the contract rounds a run-time B to bf16 as ORT's Cast does, so the products
   see the values they saw before, and each step's Concat, the beam reorder and the products move half the bytes.
   The keys are read as K^T times a constant scalar (optimum splits the attention scale as sqrt on Q and on K^T)
   and that product is what the MatMul rounded, so the cache holds the keys times that scalar: bf16(s*K), the
   Mul moved in front of the Concat (per new token, the same fp32 product) and dropped behind it. So the cache is
   the graph's own business: only onnx_model feeds it back (word timing runs a decoder of its own). Where the EP
   leaves a MatMul to the CPU EP, the Cast runs there and the CPU's MatMul sees the bf16 K/V (as pass 4: not for
   the CPU EP or bf16x3). XDNA_BF16_SELF_KV=0 keeps the self-attention cache in fp32.

9. The encoder (`optimise_encoder`, a copy of its own), for the XDNA EP only: passes 1 and 2. optimum's encoder
   computes each attention's four Reshape targets from Shape chains on the LayerNormalization's output; proven
   constant, those chains go (~190 of its ~450 nodes for whisper-base), and with them what kept the EP's claims
   from the nodes around its attention: the Shape nodes were the LayerNormalization's fourth and fifth readers (the
   EP takes it as its projections' A prologue only when they are its only readers, ops/matmul.cc), and a head
   split or merge is read through only as a Reshape to a constant (ops/transpose_fusion.h, ops/attention.cc),
   which also brings Q's scale Mul in front of the split into the attention's scale. Whisper-base, int8: 90
   encoder nodes on the CPU EP before, 1 after (the final LayerNormalization, a graph output; the conv takes the
   Transpose and the positional Add after it itself, ops/conv.cc). The EP's nodes give the original's bits (its LayerNormalization computes
   as ORT's; Q's scale, 0.125 for Whisper's 64-dim heads, is a power of two: scaling the fp32 scores instead
   of Q rounds nothing differently).
   Not for the CPU EP, whose own fusions of the copy (which match more of it) round
   differently, nor for a bf16x3 policy (the EP's attention is then unfused and ORT fuses the rest): both keep
   optimum's encoder (onnx_model.WhisperOnnx).

10. Position work (`fold_position_work`, after pass 1): the decoder computes its positions as Range(past, past +
   new) and its causal mask from the Shape of that Range (its length: new, the dimension it was made from, which
   is used instead) and from chains of one-axis Unsqueezes (merged into one Unsqueeze each). Integer work only:
   the same numbers with 6 of its 21 nodes left to the CPU EP fewer per step (whisper-base decoder_with_past).

The originals are never changed: copies live in <cache>/optimised/<content hash of the source>-<pass version>-<hash of
this file>-<ORT and onnx versions>[-bf16kv[-self]]/, written
atomically, and a copy that fails to build or load is logged and the original is used (onnx_model.WhisperOnnx).
XDNA_OPTIMISED_DECODERS=0 switches the copies off; XDNA_BF16_CROSS_KV=0 only the bf16 cross-attention K/V (and
with them the bf16 self-attention cache); XDNA_BF16_SELF_KV=0 only the latter.
"""

from __future__ import annotations

import collections
import os
import shutil
import time
from pathlib import Path
from typing import Callable

# Bump when a pass changes what it writes: older copies are then simply not used. (The cache key also holds a
# hash of BUILDER_SOURCES, so a pass changed without a bump, or another package version, cannot serve an old copy.)
VERSION = 9
# The code that makes a copy: every pass lives in this file.
BUILDER_SOURCES = (Path(__file__),)
DECODER_FILES = ("decoder_model.onnx", "decoder_with_past_model.onnx")
ENCODER_FILE = "encoder_model.onnx"
OPTIMISED_FILES = (ENCODER_FILE, *DECODER_FILES)  # the files with a copy (onnx_model.WhisperOnnx)


def enabled() -> bool:
    return os.environ.get("XDNA_OPTIMISED_DECODERS", "1") != "0"


def bf16_cross_kv_enabled() -> bool:
    return os.environ.get("XDNA_BF16_CROSS_KV", "1") != "0"


def bf16_self_kv_enabled() -> bool:
    return os.environ.get("XDNA_BF16_SELF_KV", "1") != "0"


CROSS_KV = (".encoder.key", ".encoder.value")
SELF_KV = (".decoder.key", ".decoder.value")


LOGITS_ROWS = "xdna_logits_rows"


def logits_rows(model) -> bool:
    """Pass 3 (module doc) in place, on a graph whose output `logits` [batch, positions, vocab] is a MatMul of the
    hidden states by a constant: Gather(hidden, xdna_logits_rows, axis=1) in front of it. The input is required
    (a default would not survive the compiled-model cache, which turns it into a constant). Returns whether it was
    done (a graph of another form, or one that already has the input, is left as it is)."""
    from onnx import TensorProto, helper

    g = model.graph
    out = next((o for o in g.output if o.name == "logits"), None)
    node = next((n for n in g.node if "logits" in n.output), None)
    constants = {i.name for i in g.initializer}
    if out is None or node is None or node.op_type != "MatMul" or node.input[1] not in constants or \
            any(i.name == LOGITS_ROWS for i in g.input) or len(out.type.tensor_type.shape.dim) != 3:
        return False
    rows = f"{node.input[0]}/xdna_logits_rows"
    g.input.append(helper.make_tensor_value_info(LOGITS_ROWS, TensorProto.INT64, ["logits_rows"]))
    gather = helper.make_node("Gather", [node.input[0], LOGITS_ROWS], [rows], axis=1, name=rows)
    node.input[0] = rows
    nodes = list(g.node)
    nodes.insert(nodes.index(node), gather)
    del g.node[:]
    g.node.extend(nodes)
    dim = out.type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_param = "logits_rows"
    return True


def _rename_uses(g, name: str, new: str, outputs: bool = False) -> None:
    """Every node input (and with `outputs` every node output) called `name` renamed to `new`."""
    for node in g.node:
        for names in (node.input, node.output) if outputs else (node.input,):
            for i, n in enumerate(names):
                if n == name:
                    names[i] = new


def _rename_value_info(g, name: str, new: str) -> None:
    for vi in g.value_info:
        if vi.name == name:
            vi.name = new


def bf16_cross_kv(model) -> int:
    """Pass 4 (module doc) in place: decoder_model's `present.N.encoder.*` outputs become bf16 (a Cast after the
    value the graph computed), decoder_with_past's `past_key_values.N.encoder.*` inputs become bf16 (a Cast to
    float in front of their readers). Returns the number of Casts added."""
    from onnx import TensorProto, helper

    g = model.graph
    added = 0
    for out in g.output:
        if out.name.startswith("present.") and out.name.endswith(CROSS_KV) and \
                out.type.tensor_type.elem_type == TensorProto.FLOAT:
            fp32 = f"{out.name}/xdna_fp32"
            _rename_value_info(g, out.name, fp32)
            _rename_uses(g, out.name, fp32, outputs=True)
            g.node.append(helper.make_node("Cast", [fp32], [out.name], to=TensorProto.BFLOAT16,
                                           name=f"{out.name}/xdna_to_bf16"))
            out.type.tensor_type.elem_type = TensorProto.BFLOAT16
            added += 1
    casts = []
    for inp in g.input:
        if inp.name.startswith("past_key_values.") and inp.name.endswith(CROSS_KV) and \
                inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            fp32 = f"{inp.name}/xdna_fp32"
            _rename_value_info(g, inp.name, fp32)
            _rename_uses(g, inp.name, fp32)
            casts.append(helper.make_node("Cast", [inp.name], [fp32], to=TensorProto.FLOAT,
                                          name=f"{inp.name}/xdna_to_fp32"))
            inp.type.tensor_type.elem_type = TensorProto.BFLOAT16
    nodes = casts + list(g.node)  # in front: the graph stays in topological order
    del g.node[:]
    g.node.extend(nodes)
    return added + len(casts)


HEAD_SPLIT = [0, 2, 1, 3]  # [batch, frames, heads, dim] -> [batch, heads, frames, dim]


def _perm(node) -> list[int] | None:
    from onnx import helper

    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)


def cast_before_head_split(model) -> int:
    """Pass 5 (module doc) in place, on a decoder_model pass 4 has made: each bf16 cross K/V output that is
    Cast(Transpose(x, HEAD_SPLIT)), the Transpose read by the Cast only, becomes Transpose(Cast(x), HEAD_SPLIT).
    Returns the outputs changed."""
    from onnx import helper

    g = model.graph
    producers = {o: n for n in g.node for o in n.output if o}
    readers = collections.Counter(i for n in g.node for i in n.input)
    nodes = list(g.node)
    changed = 0
    for out in g.output:
        cast = producers.get(out.name)
        if not (out.name.startswith("present.") and out.name.endswith(CROSS_KV)) or cast is None or \
                cast.op_type != "Cast":
            continue
        split = producers.get(cast.input[0])
        if split is None or split.op_type != "Transpose" or _perm(split) != HEAD_SPLIT or readers[cast.input[0]] != 1:
            continue  # a head split the attention reads too (V) stays: its contiguous copy is what the EP reads
        bf16 = f"{out.name}/xdna_bf16_frames_first"
        cast.input[0], cast.output[0] = split.input[0], bf16
        transpose = helper.make_node("Transpose", [bf16], [out.name], perm=HEAD_SPLIT,
                                     name=f"{out.name}/xdna_head_split")
        nodes.insert(nodes.index(cast) + 1, transpose)
        changed += 1
    del g.node[:]
    g.node.extend(nodes)
    remove_dead_nodes(model)
    return changed


MOVES = ("Reshape", "Transpose")  # ops that only move values: a Cast commutes with them


def cast_at_projection(model) -> int:
    """Pass 8 (module doc) in place, on a decoder_model passes 4 and 5 have made: each bf16 cross K/V output made
    by Reshapes / Transposes and one Cast to bf16 from the fp32 output of a MatMul or Add read by that chain alone
    becomes Cast first, then the same moves on bf16. A value of the moves before the Cast that something else
    reads (the attention) is made from its bf16 counterpart by a Cast to float. Returns the outputs changed."""
    from onnx import TensorProto, helper

    g = model.graph
    producers = {o: n for n in g.node for o in n.output if o}
    readers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    graph_outputs = {o.name for o in g.output}
    nodes = list(g.node)
    changed = 0
    for out in g.output:
        if not (out.name.startswith("present.") and out.name.endswith(CROSS_KV)) or \
                out.type.tensor_type.elem_type != TensorProto.BFLOAT16:
            continue
        chain, value = [], out.name  # back from the output to the projection
        while (n := producers.get(value)) is not None and (n.op_type in MOVES or n.op_type == "Cast"):
            chain.append(n)
            value = n.input[0]
        chain.reverse()
        casts = [i for i, n in enumerate(chain) if n.op_type == "Cast"]
        projection = producers.get(value)
        if len(casts) != 1 or casts[0] == 0 or projection is None or projection.op_type not in ("MatMul", "Add") or \
                len(readers[value]) != 1 or value in graph_outputs or \
                next(a.i for a in chain[casts[0]].attribute if a.name == "to") != TensorProto.BFLOAT16:
            continue  # already cast at the projection, or a chain of another form
        cast, before = chain[casts[0]], chain[:casts[0]]
        made = [helper.make_node("Cast", [value], [f"{value}/xdna_bf16"], to=TensorProto.BFLOAT16,
                                 name=f"{out.name}/xdna_cast_at_projection")]
        prev = made[0].output[0]
        for i, move in enumerate(before):
            bf16 = cast.output[0] if i == len(before) - 1 else f"{move.output[0]}/xdna_bf16"
            copy = helper.make_node(move.op_type, [prev] + list(move.input[1:]), [bf16], name=f"{move.name}/xdna_bf16")
            copy.attribute.extend(move.attribute)
            made.append(copy)
            prev = bf16
            if any(r.output != chain[i + 1].output for r in readers[move.output[0]]) or move.output[0] in graph_outputs:
                made.append(helper.make_node("Cast", [bf16], [move.output[0]], to=TensorProto.FLOAT,
                                             name=f"{move.output[0]}/xdna_to_fp32"))
        at = nodes.index(before[0])
        for n in before + [cast]:
            nodes.remove(n)
        nodes[at:at] = made
        changed += 1
    del g.node[:]
    g.node.extend(nodes)
    return changed


def _scalar_of(name: str, constants: dict) -> float | None:
    value = constants.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 and value.dtype == "float32" else None


def _key_scale(transpose, readers: dict, constants: dict, graph_outputs: set):
    """(Mul, scale) when `transpose`'s output is read by one Mul by a constant float32 scalar alone, whose output is
    read by MatMuls as their B alone (the scaled K^T of an attention); else None."""
    out = transpose.output[0]
    mul = readers.get(out, [])
    if len(mul) != 1 or mul[0].op_type != "Mul" or len(mul[0].input) != 2 or out in graph_outputs:
        return None
    mul = mul[0]
    other = [i for i in mul.input if i != out]
    scale = _scalar_of(other[0], constants) if len(other) == 1 else None
    users = readers.get(mul.output[0], [])
    if scale is None or not users or mul.output[0] in graph_outputs or \
            any(u.op_type != "MatMul" or u.input[0] == mul.output[0] or u.input[1] != mul.output[0] for u in users):
        return None
    return mul, scale


class NotThisForm(ValueError):
    """A graph whose self-attention cache pass 7 does not recognise (the copy then falls back as a whole)."""


def bf16_self_kv(model) -> int:
    """Pass 7 (module doc) in place, on decoder_model or decoder_with_past (after pass 4). All or nothing: raises
    NotThisForm when a layer's cache is not of the form below, so that both graphs agree on the cache's type and
    meaning (a copy that fails to build is not used). Returns the number of nodes added.
      decoder_with_past: present.N.decoder.key = Concat(past, k_new), read by Transpose -> Mul(s) -> MatMul B;
                         present.N.decoder.value = Concat(past, v_new), read by MatMuls as B.
      decoder_model:     present.N.decoder.key = Transpose(x), where x is also read by Transpose -> Mul(s) -> MatMul B
                         (the prompt's own attention, left fp32); present.N.decoder.value any value."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    producers = {o: n for n in g.node for o in n.output if o}
    readers = _readers(g)
    constants = _small_constants(g)
    graph_outputs = {o.name for o in g.output}
    inputs = {i.name: i for i in g.input}
    outputs = [o for o in g.output if o.name.startswith("present.") and o.name.endswith(SELF_KV)]
    if not outputs:
        raise NotThisForm("no present.N.decoder.* outputs")
    plans = []  # (out, the Concat of past and new or None, (Mul, scale) of the keys or None)
    for out in outputs:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise NotThisForm(f"{out.name} is not float32")
        node = producers.get(out.name)
        is_key = out.name.endswith(".key")
        past = out.name.replace("present.", "past_key_values.", 1)
        users = readers.get(out.name, [])
        if node is None:
            raise NotThisForm(f"{out.name}: no node makes it")
        if past in inputs:  # decoder_with_past
            if node.op_type != "Concat" or len(node.input) != 2 or node.input[0] != past or \
                    inputs[past].type.tensor_type.elem_type != TensorProto.FLOAT:
                raise NotThisForm(f"{out.name}: not Concat({past}, new)")
            if is_key:
                found = _key_scale(users[0], readers, constants, graph_outputs) \
                    if len(users) == 1 and users[0].op_type == "Transpose" else None
                if found is None:
                    raise NotThisForm(f"{out.name}: not read as Transpose -> Mul(scalar) -> MatMul B")
            else:
                found = None
                if not users or any(u.op_type != "MatMul" or u.input[0] == out.name or u.input[1] != out.name
                                    for u in users):
                    raise NotThisForm(f"{out.name}: not read as the B of MatMuls alone")
            plans.append((out, node, found))
        elif not is_key:  # decoder_model: any value
            plans.append((out, None, None))
        else:  # decoder_model: the keys' head split, their K^T scaled for the prompt's own attention
            if users or node.op_type != "Transpose":
                raise NotThisForm(f"{out.name}: not a Transpose read by nothing else")
            found = next((f for t in readers.get(node.input[0], []) if t is not node and t.op_type == "Transpose"
                          for f in [_key_scale(t, readers, constants, graph_outputs)] if f), None)
            if found is None:
                raise NotThisForm(f"{out.name}: no scaled K^T read from the same keys")
            plans.append((out, None, found))

    nodes = list(g.node)
    added = 0

    def scaled(value: str, out_name: str, scale: float) -> tuple[str, list]:
        """value x scale (a float32 scalar of its own: the graph's Constant may come later in node order)."""
        s_name, product = f"{out_name}/xdna_key_scale", f"{out_name}/xdna_scaled"
        g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), s_name))
        return product, [helper.make_node("Mul", [value, s_name], [product], name=f"{out_name}/xdna_scale")]

    for out, concat, found in plans:
        to_bf16 = f"{out.name}/xdna_to_bf16"
        fp32 = f"{out.name}/xdna_fp32"
        if concat is not None:
            # new -> [x s] -> bf16 -> Concat(past bf16, .) -> present (bf16) -> float -> the readers [minus the Mul]
            new_value, before = concat.input[1], []
            if found:
                new_value, before = scaled(new_value, out.name, found[1])
            new16 = f"{out.name}/xdna_new_bf16"
            before.append(helper.make_node("Cast", [new_value], [new16], to=TensorProto.BFLOAT16, name=to_bf16))
            concat.input[1] = new16
            _rename_uses(g, out.name, fp32)
            after = [helper.make_node("Cast", [out.name], [fp32], to=TensorProto.FLOAT, name=f"{out.name}/xdna_to_fp32")]
            if found:  # the cache holds the Mul's product now: its readers read its tensor input instead
                mul = found[0]
                kt = next(i for i in mul.input if _scalar_of(i, constants) is None)
                for u in readers[mul.output[0]]:
                    u.input[1] = kt
                nodes.remove(mul)
            at = nodes.index(concat)
            nodes[at:at + 1] = before + [concat] + after
            inputs[out.name.replace("present.", "past_key_values.", 1)].type.tensor_type.elem_type = \
                TensorProto.BFLOAT16
            added += len(before) + len(after)
        else:
            # decoder_model: the value the graph computed -> [x s] -> bf16 -> present (bf16)
            _rename_value_info(g, out.name, fp32)
            _rename_uses(g, out.name, fp32, outputs=True)
            value, extra = scaled(fp32, out.name, found[1]) if found else (fp32, [])
            extra.append(helper.make_node("Cast", [value], [out.name], to=TensorProto.BFLOAT16, name=to_bf16))
            nodes.extend(extra)
            added += len(extra)
        out.type.tensor_type.elem_type = TensorProto.BFLOAT16
    del g.node[:]
    g.node.extend(nodes)
    remove_dead_nodes(model)
    return added


def _symbolic_dims(model) -> dict[str, list]:
    """value name -> its dimensions (int, symbol name, or None when unknown), by symbolic shape inference."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False)
    dims = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in vi.type.tensor_type.shape.dim]
    return dims


def constant_reshape_target(source: list, target: list) -> list[int] | None:
    """The constant target shape of a Reshape from symbolic `source` to symbolic `target` dims, or None when the
    dims do not prove one (unknown dims, or more than one dim that is neither a number nor copied)."""
    if any(d is None for d in source) or any(d is None for d in target):
        return None
    out = []
    for i, d in enumerate(target):
        if isinstance(d, int):
            out.append(d)
        elif i < len(source) and source[i] == d:
            out.append(0)  # Reshape's default (allowzero=0): copy the input's dimension
        else:
            out.append(-1)
    return out if out.count(-1) <= 1 else None


def fold_shape_work(model) -> int:
    """Pass 1 (module doc) in place; returns the number of Reshapes and Slices changed or removed."""
    import numpy as np
    from onnx import numpy_helper

    dims = _symbolic_dims(model)
    g = model.graph
    constant = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    graph_outputs = {o.name for o in g.output}
    renamed: dict[str, str] = {}
    removed, changed = [], 0
    for node in g.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue  # 0 would mean a zero-sized dimension
        source, target = dims.get(node.input[0]), dims.get(node.output[0])
        if source is None or target is None:
            continue
        if source == target and node.output[0] not in graph_outputs:
            renamed[node.output[0]] = node.input[0]
            removed.append(node)
            continue
        if node.input[1] in constant:
            continue
        shape = constant_reshape_target(source, target)
        if shape is None:
            continue
        name = f"{node.output[0]}/xdna_constant_shape"
        g.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), name))
        node.input[1] = name
        changed += 1
    constants = _small_constants(g)
    for node in g.node:
        if node.op_type == "Slice" and node.domain in ("", "ai.onnx") and _identity_slice(node, dims, constants):
            if node.output[0] not in graph_outputs:
                renamed[node.output[0]] = node.input[0]
                removed.append(node)
    for node in removed:
        g.node.remove(node)
    _rename_inputs(g, renamed)
    remove_dead_nodes(model)
    return changed + len(removed)


def _rename_inputs(g, renamed: dict[str, str]) -> None:
    for node in g.node:
        for i, name in enumerate(node.input):
            while name in renamed:
                name = renamed[name]
            node.input[i] = name


def _readers(g) -> dict[str, list]:
    """value name -> the nodes that read it (each node once, in graph order)."""
    readers: dict[str, list] = {}
    for node in g.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    return readers


def _small_constants(g) -> dict:
    """name -> numpy value of the graph's small constants (initializers and Constant nodes, up to 64 elements)."""
    from onnx import numpy_helper

    tensors = [(i.name, i) for i in g.initializer]
    tensors += [(n.output[0], a.t) for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    out = {}
    for name, t in tensors:
        if t.data_location != 1 and (n := numpy_helper.to_array(t)).size <= 64:  # external data is never small
            out[name] = n
    return out


def _identity_slice(node, dims: dict, constants: dict) -> bool:
    """A Slice whose output has its input's symbolic shape and whose steps are all 1 (or absent) copies its input
    unchanged (with step 1, a full-length result starts at 0)."""
    source, target = dims.get(node.input[0]), dims.get(node.output[0])
    if source is None or source != target or any(d is None for d in source):
        return False
    if len(node.input) < 5 or not node.input[4]:
        return True
    steps = constants.get(node.input[4])
    return steps is not None and bool((steps == 1).all())


# Readers that keep a broadcast's values elementwise (f(broadcast(x)) = broadcast(f(x))), and binary ops that
# broadcast their operands themselves.
_ELEMENTWISE = ("Cast", "Where", "Not", "Neg")
_BROADCASTING = ("Add", "Sub", "Mul", "Div", "And", "Or")


def _broadcast_absorbed(value: str, readers: dict, dims: dict, constants: set, graph_outputs: set) -> bool:
    """Whether every use of `value` reaches, through elementwise ops (and Gathers that index a constant with it),
    a broadcasting binary op whose other operand alone has the op's output shape: then `value` may as well be
    smaller by broadcasting, the op broadcasts it itself to the same numbers."""
    if value in graph_outputs or not readers.get(value):
        return False
    for node in readers[value]:
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Gather" and list(node.input).index(value) == 1 and node.input[0] in constants and \
                all(a.i == 0 for a in node.attribute if a.name == "axis"):
            ok = _broadcast_absorbed(node.output[0], readers, dims, constants, graph_outputs)
        elif node.op_type in _ELEMENTWISE:
            ok = _broadcast_absorbed(node.output[0], readers, dims, constants, graph_outputs)
        elif node.op_type in _BROADCASTING and len(node.input) == 2 and node.input[0] != node.input[1]:
            other = node.input[1] if node.input[0] == value else node.input[0]
            out = dims.get(node.output[0])
            ok = out is not None and None not in out and dims.get(other) == out
        else:
            ok = False
        if not ok:
            return False
    return True


def drop_absorbed_broadcasts(model) -> int:
    """Pass 6 (module doc) in place: a Tile or Expand whose every use broadcasts anyway (_broadcast_absorbed), and whose input
    is broadcast-compatible with its output (each dim 1 or the output's, right-aligned), is dropped; the shape
    work that only computed its repeats or shape goes with it. E.g. the decoder's position ids tiled over the
    batch before their embedding is added to the tokens', and its causal mask expanded to [batch, 1, q, k] before
    it is added to every layer's scores. The same numbers: only where a value is broadcast changes."""
    dims = _symbolic_dims(model)
    g = model.graph
    constants = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    graph_outputs = {o.name for o in g.output}
    dropped = 0
    while True:  # backwards: an Expand that fed a dropped Tile is read by the Tile's readers now
        readers = _readers(g)
        for node in reversed(g.node):
            if node.op_type not in ("Tile", "Expand") or node.domain not in ("", "ai.onnx"):
                continue
            source, target = dims.get(node.input[0]), dims.get(node.output[0])
            if source is None or target is None or None in source or None in target or len(source) > len(target):
                continue
            if any(d != 1 and d != t for d, t in zip(reversed(source), reversed(target))):
                continue
            if _broadcast_absorbed(node.output[0], readers, dims, constants, graph_outputs):
                g.node.remove(node)
                _rename_inputs(g, {node.output[0]: node.input[0]})
                dropped += 1
                break
        else:
            break
    remove_dead_nodes(model)
    return dropped


def merge_duplicates(model) -> int:
    """Common subexpressions: nodes of one deterministic op with the same attributes and the same inputs (constants
    compared by value) compute the same value; all but the first are removed. Returns the number removed."""
    g = model.graph
    values = {name: repr((v.dtype.str, v.shape)).encode() + v.tobytes() for name, v in _small_constants(g).items()}
    graph_outputs = {o.name for o in g.output}
    seen: dict[tuple, list[str]] = {}
    renamed: dict[str, str] = {}
    removed = []
    for node in g.node:
        if node.op_type == "Constant" or node.op_type.startswith(("Random", "Multinomial", "Bernoulli")) or any(
                a.HasField("g") or len(a.graphs) for a in node.attribute):
            continue
        inputs = []
        for name in node.input:
            while name in renamed:
                name = renamed[name]
            inputs.append(values.get(name, name.encode()))
        key = (node.domain, node.op_type, tuple(inputs),
               tuple(sorted(a.SerializeToString() for a in node.attribute)), len(node.output))
        first = seen.get(key)
        if first is None or any(o in graph_outputs for o in node.output):
            seen.setdefault(key, list(node.output))
            continue
        for o, keep in zip(node.output, first):
            if o:
                renamed[o] = keep
        removed.append(node)
    for node in removed:
        g.node.remove(node)
    _rename_inputs(g, renamed)
    remove_dead_nodes(model)
    return len(removed)


def _tensor_dim(name: str, producers: dict, constants: dict) -> bool:
    """Whether `name` is Gather(Shape(x), i) with a constant scalar i: one of x's dimensions, an int64 >= 0."""
    node = producers.get(name)
    if node is None or node.op_type != "Gather" or len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
        return False
    shape = producers.get(node.input[0])
    index = constants.get(node.input[1])
    return (shape is not None and shape.op_type == "Shape" and not shape.attribute and index is not None
            and index.ndim == 0 and all(a.i == 0 for a in node.attribute if a.name == "axis"))


def _range_length(shape_gather, producers: dict, constants: dict) -> str | None:
    """For Gather(Shape(Range(start, Add(start, n), 1)), 0) or Gather(Shape(Range(0, n, 1)), 0) with n (and start)
    a tensor dimension (_tensor_dim): n, the Range's length (limit - start = n >= 0 steps of 1); else None. Casts to int64 are seen through: what they read
    is an int64 already (a dimension, or a sum of dimensions)."""
    def uncast(name):
        while (node := producers.get(name)) is not None and node.op_type == "Cast" and \
                any(a.name == "to" and a.i == 7 for a in node.attribute):
            name = node.input[0]
        return name

    index = constants.get(shape_gather.input[1]) if len(shape_gather.input) == 2 else None
    shape = producers.get(shape_gather.input[0])
    if index is None or index.ndim != 0 or int(index) != 0 or shape is None or shape.op_type != "Shape" or \
            shape.attribute or any(a.i != 0 for a in shape_gather.attribute if a.name == "axis"):
        return None
    rng = producers.get(shape.input[0])
    if rng is None or rng.op_type != "Range" or len(rng.input) != 3:
        return None
    delta = constants.get(rng.input[2])
    if delta is None or delta.size != 1 or int(delta.reshape(())) != 1:
        return None
    start, limit = uncast(rng.input[0]), uncast(rng.input[1])
    zero = constants.get(start)
    if zero is not None and zero.size == 1 and int(zero.reshape(())) == 0:  # Range(0, n, 1)
        return limit if _tensor_dim(limit, producers, constants) else None
    add = producers.get(limit)
    if add is None or add.op_type != "Add" or list(add.input).count(start) != 1 or \
            not _tensor_dim(start, producers, constants):
        return None
    n = add.input[1] if add.input[0] == start else add.input[0]
    return n if _tensor_dim(n, producers, constants) else None


def _merged_unsqueeze_axes(inner: list[int], outer: list[int]) -> list[int] | None:
    """The axes of one Unsqueeze doing Unsqueeze(Unsqueeze(x, inner), outer), or None where a negative axis needs
    x's rank."""
    if any(a < 0 for a in inner + outer):
        return None
    dims = []  # the intermediate's dims: True where inner inserted one
    for axis in sorted(inner):
        while len(dims) < axis:
            dims.append(False)
        dims.insert(axis, True)
    for axis in sorted(outer):
        while len(dims) < axis:
            dims.append(False)
        dims.insert(axis, True)
    return [i for i, new in enumerate(dims) if new]


def fold_position_work(model) -> int:
    """Pass 10 (module doc) in place; returns the number of nodes changed."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    constants = _small_constants(g)
    renamed: dict[str, str] = {}
    changed = 0
    producers = {o: n for n in g.node for o in n.output}
    for node in g.node:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and \
                (n := _range_length(node, producers, constants)) is not None and node.output[0] not in \
                {o.name for o in g.output}:
            renamed[node.output[0]] = n
            changed += 1
    _rename_inputs(g, renamed)
    for node in g.node:  # graph order: an inner Unsqueeze is already merged with its own inner one
        if node.op_type != "Unsqueeze" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        inner = producers.get(node.input[0])
        if inner is None or inner.op_type != "Unsqueeze" or len(inner.input) != 2:
            continue
        a, b = constants.get(inner.input[1]), constants.get(node.input[1])
        axes = None if a is None or b is None else _merged_unsqueeze_axes(a.ravel().tolist(), b.ravel().tolist())
        if axes is None:
            continue
        name = f"{node.output[0]}/xdna_axes"
        g.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
        constants[name] = np.array(axes, np.int64)
        node.input[0], node.input[1] = inner.input[0], name
        changed += 1
    remove_dead_nodes(model)
    return changed


def remove_dead_nodes(model) -> int:
    """Removes nodes none of whose outputs is read (by a node, a subgraph or the graph's outputs), and initializers
    no node reads. Returns the number of nodes removed."""
    g = model.graph
    needed = {o.name for o in g.output}

    def reads(node):
        names = set(node.input)
        for a in node.attribute:  # subgraphs read outer values by name
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                for n in sub.node:
                    names |= reads(n)
        return names

    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed |= reads(node)
    removed = len(g.node) - len(keep)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    unused = [i for i in g.initializer if i.name not in needed]
    for i in unused:
        g.initializer.remove(i)
    return removed


def optimise(source: Path, output: Path, bf16_kv: bool = False, bf16_self: bool = False) -> dict:
    """The passes on `source` into `output` (passes 4 and 5 too with `bf16_kv`, and 7 with `bf16_self`). Returns
    what was done."""
    import onnx

    source = Path(source)
    model = onnx.load(str(source))
    nodes = len(model.graph.node)
    shapes = fold_shape_work(model)
    positions = fold_position_work(model)
    merged = merge_duplicates(model)
    broadcasts = drop_absorbed_broadcasts(model)
    rows = logits_rows(model) if source.name == DECODER_FILES[0] else False
    casts = bf16_cross_kv(model) if bf16_kv else 0
    cast_first = cast_before_head_split(model) if bf16_kv else 0
    at_projection = cast_at_projection(model) if bf16_kv else 0
    self_casts = bf16_self_kv(model) if bf16_kv and bf16_self else 0
    onnx.save(model, str(output))
    return {"nodes_before": nodes, "nodes_after": len(model.graph.node), "shape_nodes": shapes, "merged": merged,
            "broadcasts": broadcasts, "position_nodes": positions, "logits_rows": rows, "bf16_casts": casts,
            "cast_first": cast_first,
            "cast_at_projection": at_projection,
            "bf16_self_nodes": self_casts}


def optimise_encoder(source: Path, output: Path) -> dict:
    """Pass 9 (module doc): passes 1 and 2 on the encoder `source` into `output`. Returns what was done (the keys
    optimise returns that apply)."""
    import onnx

    model = onnx.load(str(source))
    nodes = len(model.graph.node)
    shapes = fold_shape_work(model)
    merged = merge_duplicates(model)
    onnx.save(model, str(output))
    return {"nodes_before": nodes, "nodes_after": len(model.graph.node), "shape_nodes": shapes, "merged": merged,
            "broadcasts": 0}


def _versions() -> str:
    """The pass version, a hash of the passes' own source (BUILDER_SOURCES) and the versions of the libraries
    that load, infer shapes of and write the copy."""
    import onnx
    import onnxruntime as ort

    from .._compile import source_digest

    return f"v{VERSION}-{source_digest(BUILDER_SOURCES)}-ort{ort.__version__}-onnx{onnx.__version__}"


def cache_entry(source: Path, cache_dir: str | os.PathLike | None = None, bf16_kv: bool = False,
                bf16_self: bool = False) -> Path:
    """Where the optimised copy of `source` lives: keyed by its content, the code and versions that made the copy
    (_versions) and whether it holds the cross-attention K/V (and the self-attention cache) in bf16."""
    from .._compile import _model_hash
    from .model import cache_root

    root = cache_root(cache_dir) / "optimised"
    kind = ("-bf16kv" + ("-self" if bf16_self else "")) if bf16_kv else ""
    return root / f"{_model_hash(source, root)}-{_versions()}{kind}" / source.name


def optimised_copy(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                   log: Callable[[str], None] = lambda m: None, bf16_kv: bool = False,
                   bf16_self: bool = False) -> Path:
    """The optimised copy of `source` from the cache, built into it first if absent. Concurrent builders each
    write their own temporary directory and rename it into place; the first rename wins. Raises on failure (the
    caller logs it and uses the original)."""
    source = Path(source)
    encoder = source.name == ENCODER_FILE  # pass 9: no K/V to keep in bf16
    if encoder:
        bf16_kv = bf16_self = False
    target = cache_entry(source, cache_dir, bf16_kv, bf16_self)
    if target.is_file():
        return target
    from .._compile import build_cache_entry

    t0 = time.perf_counter()
    done = build_cache_entry(target, lambda path: optimise_encoder(source, path) if encoder else
                             optimise(source, path, bf16_kv, bf16_self))
    log(f"optimised {source.name} in {time.perf_counter() - t0:.1f} s ({done['nodes_before']} -> "
        f"{done['nodes_after']} nodes; {done['shape_nodes']} Reshapes/Slices made constant or dropped, "
        f"{done['merged']} duplicates merged, {done['broadcasts']} broadcasts dropped"
        + (f", {done['position_nodes']} position nodes folded" if done.get("position_nodes") else "")
        + (", logits of the asked rows only" if done.get("logits_rows") else "")
        + (f", {done['cast_first']} cross keys cast before their head split" if done.get("cast_first") else "")
        + (f", cross-attention K/V in bf16 ({done['bf16_casts']} Casts)" if bf16_kv else "")
        + (f", {done['cast_at_projection']} of them at their projection" if done.get("cast_at_projection") else "")
        + (f", self-attention cache in bf16 ({done['bf16_self_nodes']} nodes)" if done.get("bf16_self_nodes") else "")
        + f"): {target.parent}")
    return target


def discard(copy: Path) -> None:
    """Removes one cache entry (e.g. after it failed to load)."""
    shutil.rmtree(Path(copy).parent, ignore_errors=True)
