"""opdx.xtok: byte alignment of two tokenizations, ULD / GOLD hybrid losses, the vocab map, MiniLLM."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from opdx.xtok import (
    GroupedSide,
    VocabMap,
    align_byte_ends,
    build_vocab_map,
    char_to_byte_offsets,
    future_returns,
    ids_byte_ends,
    gold_loss,
    merge_groups,
    minillm_loss,
    token_byte_ends,
    uld_loss,
    uld_per_group,
)
from tests.xtok_helpers import (
    align_reference,
    gold_reference,
    make_xtok_tokenizers,
    merged_reference,
    minillm_reference,
    problem,
    ref_distance,
    sorted_ref,
)

TEXTS = ["héllo wörld", "I ❤️ 🍕", "a  b\n\n c", "Zwölf Boxkämpfer, naïve façade 🎉🍕!", "", "x"]


def _tokens(pieces: list[str]) -> torch.Tensor:
    """Byte end offsets of hand-written token strings."""
    return torch.tensor([len("".join(pieces[: i + 1]).encode()) for i in range(len(pieces))])[None, :]


def _aligned(texts):
    s_tok, t_tok = make_xtok_tokenizers()
    s_ids, s_ends, s_len = token_byte_ends(s_tok, texts, name="student_tokenizer")
    t_ids, t_ends, t_len = token_byte_ends(t_tok, texts, name="teacher_tokenizer")
    return (s_ids, s_ends, s_len), (t_ids, t_ends, t_len), align_byte_ends(s_ends, t_ends, s_len, t_len)


def _group_texts(tok, ids, groups, n_groups):
    return [tok.decode(ids[groups == g].tolist()) for g in range(n_groups)]


# ---------------------------------------------------------------------------------------------------------------
# alignment
# ---------------------------------------------------------------------------------------------------------------


def test_char_to_byte_offsets_multibyte():
    text = "aé€🍕 ❤️"
    expected = [0]
    for ch in text:
        expected.append(expected[-1] + len(ch.encode("utf-8")))
    assert char_to_byte_offsets(text).tolist() == expected
    assert char_to_byte_offsets("").tolist() == [0]


def test_hand_written_groups_multibyte_and_whitespace():
    student = ["h", "é", "llo", " w", "ö", "rld", "  ", "\n"]
    teacher = ["hé", "ll", "o", " ", "wö", "rld", " ", " \n"]
    a = align_byte_ends(_tokens(student), _tokens(teacher))
    assert a.student_groups.tolist() == [[0, 0, 1, 2, 2, 3, 4, 4]]
    assert a.teacher_groups.tolist() == [[0, 1, 1, 2, 2, 3, 4, 4]]
    assert a.num_groups.tolist() == [5]


def test_hand_written_emoji_groups():
    # "❤️" is U+2764 U+FE0F (3 + 3 bytes); the student splits it into its two code points, the teacher does not
    student = ["I", " ", "\u2764", "\ufe0f", " ", "🍕"]
    teacher = ["I", " \u2764\ufe0f", " 🍕"]
    a = align_byte_ends(_tokens(student), _tokens(teacher))
    assert a.student_groups.tolist() == [[0, 1, 1, 1, 2, 2]]
    assert a.teacher_groups.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("text, expected", [
    ("héllo wörld", ["hé", "llo", " ", "w", "ö", "r", "ld"]),
    ("I ❤️ 🍕", ["I", " ❤️", " 🍕"]),
    ("a  b\n\n c", ["a", " ", " b", "\n", "\n", " c"]),
])
def test_tokenizer_groups_known(text, expected):
    (s_ids, _, _), (t_ids, _, _), a = _aligned([text])
    s_tok, t_tok = make_xtok_tokenizers()
    n = int(a.num_groups[0])
    assert _group_texts(s_tok, s_ids[0], a.student_groups[0], n) == expected
    assert _group_texts(t_tok, t_ids[0], a.teacher_groups[0], n) == expected


def test_byte_level_split_characters_share_a_group():
    # the student tokenizer spells "ö" as two byte tokens; both must land in one group
    (s_ids, s_ends, s_len), _, a = _aligned(["wörld"])
    s_tok, _ = make_xtok_tokenizers()
    pieces = s_tok.convert_ids_to_tokens(s_ids[0, : s_len[0]].tolist())
    split = [i for i, p in enumerate(pieces) if p in ("Ã", "¶")]
    assert len(split) == 2 and s_ends[0, split[0]] == s_ends[0, split[1]] == 3
    assert a.student_groups[0, split[0]] == a.student_groups[0, split[1]]


def test_groups_spell_the_same_bytes_on_both_sides():
    (s_ids, _, _), (t_ids, _, _), a = _aligned(TEXTS)
    s_tok, t_tok = make_xtok_tokenizers()
    for b, text in enumerate(TEXTS):
        n = int(a.num_groups[b])
        s_texts = _group_texts(s_tok, s_ids[b], a.student_groups[b], n)
        assert s_texts == _group_texts(t_tok, t_ids[b], a.teacher_groups[b], n)
        assert "".join(s_texts) == text


def _random_ends(gen, total: int, n_max: int) -> list[int]:
    cuts = torch.randperm(max(total - 1, 1), generator=gen)[: int(torch.randint(0, n_max, (1,), generator=gen))] + 1
    ends = sorted(set(c for c in cuts.tolist() if c < total)) + [total]
    # repeated ends (several byte-level tokens of one character) happen too
    dup = [e for e in ends if torch.rand(1, generator=gen).item() < 0.1]
    return sorted(ends + dup) if total else []


def test_vectorized_equals_python_reference_random_batch():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    rows_s, rows_t = [], []
    for _ in range(16):
        total = int(torch.randint(0, 60, (1,), generator=gen))
        rows_s.append(_random_ends(gen, total, 30))
        rows_t.append(_random_ends(gen, total, 30))
    pad = torch.nn.utils.rnn.pad_sequence
    s = pad([torch.tensor(r, dtype=torch.int64) for r in rows_s], batch_first=True, padding_value=7)
    t = pad([torch.tensor(r, dtype=torch.int64) for r in rows_t], batch_first=True, padding_value=7)
    a = align_byte_ends(s, t, [len(r) for r in rows_s], [len(r) for r in rows_t])
    for b in range(16):
        ref_s, ref_t = align_reference(rows_s[b], rows_t[b])
        assert a.student_groups[b, : len(rows_s[b])].tolist() == ref_s
        assert a.teacher_groups[b, : len(rows_t[b])].tolist() == ref_t
        assert (a.student_groups[b, len(rows_s[b]):] == -1).all()
        assert int(a.num_groups[b]) == (max(ref_s) + 1 if ref_s else 0)


def test_flat_ids_are_batch_global():
    _, _, a = _aligned(TEXTS)
    s_flat, t_flat, total = a.flat()
    assert total == int(a.num_groups.sum())
    assert torch.equal(torch.unique(s_flat), torch.arange(total))
    assert torch.equal(torch.unique(t_flat), torch.arange(total))
    assert bool((s_flat[1:] >= s_flat[:-1]).all())


def test_ids_byte_ends_exact_inside_characters():
    s_tok, _ = make_xtok_tokenizers()
    text = "héllo wörld I ❤️ 🍕 naïve"
    ids = s_tok(text, add_special_tokens=False)["input_ids"]
    ends = ids_byte_ends(s_tok, torch.tensor([ids]))[0].tolist()
    assert ends[-1] == len(text.encode())
    checked = 0
    for k in range(1, len(ids) + 1):
        prefix = s_tok.decode(ids[:k])
        if "\ufffd" not in prefix:  # prefixes ending inside a character do not decode
            assert ends[k - 1] == len(prefix.encode()), k
            checked += 1
    assert 0 < checked < len(ids)  # some tokens end inside a character


def test_sampled_ids_with_eos_align_to_retokenized_teacher():
    s_tok, t_tok = make_xtok_tokenizers()
    # a non-canonical student sample: single characters, then EOS (special: 0 bytes, joins the last group)
    pieces = ["h", "é", "l", "l", "o", " ", "w"]
    ids = sum((s_tok(p, add_special_tokens=False)["input_ids"] for p in pieces), []) + [s_tok.eos_token_id]
    text = s_tok.decode(ids, skip_special_tokens=True)
    assert text == "héllo w"
    s_ends = ids_byte_ends(s_tok, torch.tensor([ids]))
    t_ids, t_ends, t_len = token_byte_ends(t_tok, [text])
    a = align_byte_ends(s_ends, t_ends, None, t_len)
    n = int(a.num_groups[0])
    assert a.student_groups[0, -1] == n - 1  # EOS is in the last group
    body = torch.tensor(ids[:-1])
    s_texts = _group_texts(s_tok, body, a.student_groups[0, :-1], n)
    assert s_texts == _group_texts(t_tok, t_ids[0], a.teacher_groups[0], n)
    with pytest.raises(ValueError, match="outside student_tokenizer's vocabulary"):
        ids_byte_ends(s_tok, torch.tensor([[len(s_tok) + 5]]), name="student_tokenizer")


def test_error_slow_tokenizer():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="not a fast tokenizer"):
        token_byte_ends(Slow(), ["hi"], name="teacher_tokenizer")


def test_error_trimmed_offsets_report_byte():
    from tokenizers import processors

    tok = copy.deepcopy(make_xtok_tokenizers()[0])
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    with pytest.raises(ValueError, match=r"cannot be aligned at byte 1\b.*trim_offsets"):
        token_byte_ends(tok, ["a  b"], name="student_tokenizer")


def test_error_different_texts_report_byte():
    s = _tokens(["ab", "c", "de"])
    t = _tokens(["a", "bc", "dxy"])  # ends 1, 3, 6 vs 2, 3, 5: agree up to byte 3
    with pytest.raises(ValueError, match="completion 0 cannot be aligned after byte 3"):
        align_byte_ends(s, t)


def test_error_bad_ends_and_lengths():
    with pytest.raises(ValueError, match="non-decreasing.*row 0 token 1"):
        align_byte_ends(torch.tensor([[3, 2]]), torch.tensor([[3]]))
    with pytest.raises(ValueError, match="student_lengths"):
        align_byte_ends(torch.tensor([[3]]), torch.tensor([[3]]), student_lengths=[2])
    with pytest.raises(TypeError, match="teacher_ends"):
        align_byte_ends(torch.tensor([[3]]), torch.tensor([[3.0]]))


# ---------------------------------------------------------------------------------------------------------------
# losses: float64 references written independently (explicit loops over groups and tokens)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["observed", "first"])
@pytest.mark.parametrize("top_m, p", [(5, 1.0), (40, 1.0), (3, 2.0)])
def test_uld_matches_float64_reference(rule, top_m, p):
    (sl, sy, sg), (tl, ty, tg), n = problem()
    student = merge_groups(sl, sy, sg, n, rule=rule)
    teacher = merge_groups(tl, ty, tg, n, rule=rule)
    got = uld_per_group(student, teacher, top_m=top_m, p=p)
    for g in range(n):
        ref = ref_distance(sorted_ref(merged_reference(sl, sy, sg, g, rule), top_m),
                            sorted_ref(merged_reference(tl, ty, tg, g, rule), top_m), p)
        torch.testing.assert_close(got[g], ref, rtol=1e-10, atol=1e-12)


def test_uld_with_full_top_m_is_full_vocab_sorted_distance():
    (sl, sy, sg), (tl, ty, tg), n = problem()
    got = uld_per_group(merge_groups(sl, sy, sg, n), merge_groups(tl, ty, tg, n), top_m=100)
    for g in range(n):
        ps = torch.sort(merged_reference(sl, sy, sg, g, "observed"), descending=True).values
        pt = torch.sort(merged_reference(tl, ty, tg, g, "observed"), descending=True).values
        # the tail bucket is empty here; the observed rule's missing mass is not a bucket
        torch.testing.assert_close(got[g], ref_distance(ps, pt, 1.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["observed", "first"])
def test_uld_gradcheck(rule):
    (sl, sy, sg), (tl, ty, tg), n = problem(n_groups=3, vs=7, vt=9)
    teacher = merge_groups(tl, ty, tg, n, rule=rule)

    def fn(x):
        return uld_loss(merge_groups(x, sy, sg, n, rule=rule), teacher, top_m=4)

    assert torch.autograd.gradcheck(fn, (sl,), eps=1e-6, atol=1e-7)


def _vocab_map_forproblem(vs, vt, k, gen):
    s_ids = torch.sort(torch.randperm(vs, generator=gen)[:k]).values
    t_ids = torch.randperm(vt, generator=gen)[:k]
    return VocabMap(s_ids, t_ids)


@pytest.mark.parametrize("weight", [None, 0.3])
def test_gold_matches_float64_reference(weight):
    (sl, sy, sg), (tl, ty, tg), n = problem()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    vmap = _vocab_map_forproblem(sl.shape[1], tl.shape[1], 6, gen)
    got, stats = gold_loss(merge_groups(sl, sy, sg, n), merge_groups(tl, ty, tg, n), vmap, beta=0.4, top_m=4,
                           matched_weight=weight)
    ref = gold_reference(sl, sy, sg, tl, ty, tg, n, vmap, 0.4, 4, weight)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert 0.0 < stats["matched_share"] < 1.0


def test_gold_with_every_student_token_matched_matches_float64_reference():
    """A student vocabulary inside the teacher's (e.g. a truncated tokenizer): the matched part is every student
    column (dense path), the student's unmatched part is empty."""
    (sl, sy, sg), (tl, ty, tg), n = problem()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    vs, vt = sl.shape[1], tl.shape[1]
    vmap = VocabMap(torch.arange(vs), torch.randperm(vt, generator=gen)[:vs])
    x = sl.clone().requires_grad_(True)
    got, _ = gold_loss(merge_groups(x, sy, sg, n), merge_groups(tl, ty, tg, n), vmap, beta=0.4, top_m=4)
    y = sl.clone().requires_grad_(True)
    ref = gold_reference(y, sy, sg, tl, ty, tg, n, vmap, 0.4, 4, None)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(ref, y)[0], rtol=1e-7, atol=1e-10)


def test_gold_gradcheck():
    (sl, sy, sg), (tl, ty, tg), n = problem(n_groups=3, vs=7, vt=9)
    vmap = _vocab_map_forproblem(7, 9, 3, torch.Generator().manual_seed(1))
    teacher = merge_groups(tl, ty, tg, n)

    def fn(x):
        return gold_loss(merge_groups(x, sy, sg, n), teacher, vmap, beta=0.5, top_m=3)[0]

    assert torch.autograd.gradcheck(fn, (sl,), eps=1e-6, atol=1e-7)


def test_loss_bad_inputs():
    (sl, sy, sg), (tl, ty, tg), n = problem()
    student, teacher = merge_groups(sl, sy, sg, n), merge_groups(tl, ty, tg, n)
    with pytest.raises(ValueError, match="rule must be one of"):
        merge_groups(sl, sy, sg, n, rule="last")
    with pytest.raises(ValueError, match="group 1 has no student token"):
        merge_groups(sl, sy, torch.where(sg == 1, 0, sg), n, name="student")
    with pytest.raises(ValueError, match="non-decreasing"):
        merge_groups(sl, sy, sg.flip(0), n)
    with pytest.raises(ValueError, match="student_targets must be the observed token ids"):
        merge_groups(sl, sy.masked_fill(sg == 0, -100), sg, n, name="student")
    with pytest.raises(ValueError, match="p must be"):
        uld_loss(student, teacher, p=0.5)
    with pytest.raises(ValueError, match="top_m"):
        uld_loss(student, teacher, top_m=0)
    with pytest.raises(ValueError, match="groups but teacher"):
        uld_loss(student, GroupedSide(teacher.first_logits[:1], teacher.lse[:1], teacher.log_scale[:1]))
    empty = VocabMap(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="no token whose string matches"):
        gold_loss(student, teacher, empty)


# ---------------------------------------------------------------------------------------------------------------
# vocab map
# ---------------------------------------------------------------------------------------------------------------


def test_vocab_map_exact_string_matches_and_cache(tmp_path, monkeypatch):
    import opdx.xtok.vocab

    monkeypatch.setattr(opdx.xtok.vocab, "_MEMORY_CACHE", {})  # another test may have built this pair's map
    s_tok, t_tok = make_xtok_tokenizers()
    vmap = build_vocab_map(s_tok, t_tok, cache_dir=tmp_path)
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    # both are byte-level: equal vocabulary strings <=> equal bytes
    assert len(vmap) == len(set(s_vocab) & set(t_vocab)) > 0
    s_pieces = s_tok.convert_ids_to_tokens(vmap.student_ids.tolist())
    assert s_pieces == t_tok.convert_ids_to_tokens(vmap.teacher_ids.tolist())
    assert build_vocab_map(s_tok, t_tok) is vmap
    files = list(tmp_path.glob("vocab_map-*.pt"))
    assert len(files) == 1
    saved = torch.load(files[0], weights_only=True)
    assert torch.equal(saved["teacher_ids"], vmap.teacher_ids)


# ---------------------------------------------------------------------------------------------------------------
# MiniLLM
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, normalize", [(1.0, True), (0.7, True), (0.9, False), (0.0, True)])
def test_minillm_matches_float64_reference(gamma, normalize):
    b, n, v = 2, 6, 11
    s = torch.randn(b, n, v, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, n, v, dtype=torch.float64) * 2
    y = torch.randint(0, v, (b, n))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 4:] = False
    loss, stats = minillm_loss(s, t, y, mask, gamma=gamma, length_normalize=normalize, single_step_weight=0.5)
    ref = minillm_reference(s, t, y, mask, gamma, normalize, 0.5)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(loss, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert math.isfinite(stats["k1"]) and stats["single_step_kl"] > 0


def test_future_returns_gamma_zero_is_next_reward():
    r = torch.randn(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    out = future_returns(r, mask, gamma=0.0)
    torch.testing.assert_close(out[:, :-1], r[:, 1:])
    assert (out[:, -1] == 0).all()


def test_minillm_bad_inputs():
    s, t = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    y = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="mask must be a bool"):
        minillm_loss(s, t, y, torch.ones(1, 3))
    with pytest.raises(ValueError, match="gamma must be in"):
        minillm_loss(s, t, y, torch.ones(1, 3, dtype=torch.bool), gamma=1.5)
    with pytest.raises(ValueError, match="\\[B, T, V\\]"):
        minillm_loss(s[0], t[0], y, torch.ones(1, 3, dtype=torch.bool))


def test_merge_temperature_divides_logits():
    (sl, sy, sg), (tl, ty, tg), n = problem()
    hot = uld_per_group(merge_groups(sl, sy, sg, n, temperature=2.0), merge_groups(tl, ty, tg, n, temperature=2.0))
    ref = uld_per_group(merge_groups(sl / 2, sy, sg, n), merge_groups(tl / 2, ty, tg, n))
    torch.testing.assert_close(hot, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cols", ["some", "every"])
@pytest.mark.parametrize("given", [False, True], ids=["own_pass", "observed_given"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("which", ["all", "observed_only", "columns_only"])
def test_gathered_logprobs_one_pass_gradient_matches_autograd(temperature, which, given, cols):
    """opdx.xtok.gathered: the one-pass backward equals autograd through log_softmax + index_select / gather, for
    shared and per-group columns (a column repeated, a column equal to the target), a −inf entry, and outputs the
    loss does not use (None gradients)."""
    from opdx.xtok.gathered import gathered_logprobs

    gen = torch.Generator().manual_seed(3)
    n, v = 7, 37
    logits = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 4)
    logits[2, 5] = -math.inf
    targets = torch.randint(0, v, (n,), generator=gen)
    first = torch.tensor([0, 2, 3, 6])
    shared = torch.tensor([1, 5, 30]) if cols == "some" else torch.arange(v)  # "every": the dense-row path
    grouped = torch.stack([torch.randperm(v, generator=gen)[:4] for _ in range(4)])
    grouped[1, 0], grouped[2, 1] = int(targets[2]), grouped[2, 0]
    w_obs, w_sh, w_gr = (torch.randn(s, generator=gen, dtype=torch.float64)
                         for s in ((n,), (4, shared.numel()), (4, 4)))

    def loss(obs, sh, gr):
        parts = {"all": [obs @ w_obs, (sh * w_sh).sum(), (gr * w_gr).sum()], "observed_only": [obs @ w_obs],
                 "columns_only": [(sh * w_sh).sum(), (gr * w_gr).sum()]}[which]
        return sum(p.masked_fill(~torch.isfinite(p), 0) for p in parts)

    x = logits.clone().requires_grad_(True)
    from opdx.ops import token_logprobs

    observed = token_logprobs(logits, targets, temperature=temperature) if given else None
    got = loss(*gathered_logprobs(x, targets, first, shared_cols=shared, group_cols=grouped, temperature=temperature,
                                  observed=observed))
    (g_got,) = torch.autograd.grad(got, x)
    y = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(y / temperature, -1)
    ref = loss(lp.gather(1, targets[:, None])[:, 0], lp[first][:, shared], lp[first].gather(1, grouped))
    (g_ref,) = torch.autograd.grad(ref, y)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
