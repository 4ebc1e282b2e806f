"""Tests of tiny_world.py: build a very small world in a subprocess, load it the Hugging Face way,
and check the documented properties of the quality function on hand-made examples."""

import hashlib
import json
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ["HF_HUB_OFFLINE"] = "1"


from conftest import build_ci_world_3_gold_steps as build  # noqa: E402

import tiny_world as tw  # noqa: E402

COLUMNS = ["id", "subreddit", "title", "post", "summary"]


@pytest.fixture(scope="session")
def world(ci_world_3_gold_steps):
    return ci_world_3_gold_steps  # build(out), shared by the session (conftest): read only


def test_files_load(world):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "tokenizer", local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(world / "base_policy", local_files_only=True)
    gold = AutoModelForSequenceClassification.from_pretrained(world / "gold_rm", local_files_only=True)
    assert type(policy).__name__ == "GPTNeoXForCausalLM"
    assert type(gold).__name__ == "GPTNeoXForSequenceClassification" and gold.config.num_labels == 1
    # eos 0; pad <|padding|> the last id, distinct from eos, in the tokenizer and in every saved config
    assert gold.config.eos_token_id == policy.config.eos_token_id == tok.eos_token_id == 0
    assert gold.config.pad_token_id == policy.config.pad_token_id == tok.pad_token_id == len(tok) - 1
    assert policy.generation_config.pad_token_id == len(tok) - 1
    assert gold.config.vocab_size == policy.config.vocab_size == len(tok)
    # the gold is larger than the policy
    assert sum(p.numel() for p in gold.parameters()) > sum(p.numel() for p in policy.parameters())
    b = tw.encode_scored(tok, ["SUBREDDIT: r/pets\n\nTITLE: t\n\nPOST: p\n\nTL;DR:"] * 2, ["my dog", "cat"])
    r = tw.reward_and_features(gold, b["input_ids"], b["attention_mask"])[0]
    assert r.shape == (2,) and torch.isfinite(r).all()


def test_jsonl_columns(world):
    for split in ["train", "validation", "test"]:
        lines = (world / "data" / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) > 0
        for line in lines:
            row = json.loads(line)
            assert list(row) == COLUMNS and all(isinstance(row[k], str) for k in COLUMNS)


def test_tokenizer_round_trip_and_pad_is_not_eos(world):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for folder in ("tokenizer", "base_policy", "gold_rm"):
        tok = AutoTokenizer.from_pretrained(world / folder, local_files_only=True)
        assert isinstance(tok, PreTrainedTokenizerFast)
        assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (
            "<|endoftext|>",
            0,
            "<|padding|>",
            len(tok) - 1,
        )
    for line in (world / "data" / "validation.jsonl").read_text().splitlines()[:20]:
        row = json.loads(line)
        text = tw.prompt_of(row) + " " + row["summary"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert len(tok(tw.prompt_of(row))["input_ids"]) <= 96
        # every summary word (with its leading space) is one token
        assert len(tok(" " + row["summary"])["input_ids"]) == len(row["summary"].split())
    ids = tok("x" + tok.eos_token)["input_ids"]
    assert ids[-1] == tok.eos_token_id


def test_deterministic(world, tmp_path):
    other = build(tmp_path / "again")
    for split in ["train", "validation", "test"]:
        a = (world / "data" / f"{split}.jsonl").read_bytes()
        b = (other / "data" / f"{split}.jsonl").read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()


def ship(world, folder):
    """`folder` as tiny_world_gold/ would be for `world`: its world.json and its trained gold's weights."""
    folder.mkdir()
    (folder / "world.json").write_bytes((world / "world.json").read_bytes())
    (folder / "model.safetensors").write_bytes((world / "gold_rm" / "model.safetensors").read_bytes())
    return folder


def test_auto_loads_a_shipped_gold_and_gives_the_world_that_trained_it(world, tmp_path):
    """`--gold-weights auto`, end to end: a copy of tiny_world.py next to a `tiny_world_gold/` holding this CI world's
    trained gold and world.json, run with the same settings, loads that gold instead of training one and writes the
    world whose build trained it, gold file and measured agreement alike."""
    shipped = ship(world, tmp_path / "tiny_world_gold")
    (tmp_path / "tiny_world.py").write_bytes(open(os.path.join(ROOT, "tiny_world.py"), "rb").read())
    other = build(tmp_path / "out", 1, script=tmp_path / "tiny_world.py")
    trained = tw.sha256_of_file(world / "gold_rm" / "model.safetensors")
    assert tw.sha256_of_file(other / "gold_rm" / "model.safetensors") == trained
    a, b = json.load(open(world / "world.json")), json.load(open(other / "world.json"))
    assert a["gold_weights"] == "trained in this build"
    assert b["gold_weights"] == str(shipped / "model.safetensors")
    assert a["gold_weights_sha256"] == b["gold_weights_sha256"] == trained
    a["measured"].pop("build_seconds"), b["measured"].pop("build_seconds")
    assert a["measured"] == b["measured"]


def test_auto_takes_the_shipped_gold_only_for_the_world_it_was_trained_for(world, tmp_path, monkeypatch):
    shipped = ship(world, tmp_path / "shipped")
    monkeypatch.setattr(tw, "SHIPPED_GOLD", str(shipped))
    built = json.load(open(world / "world.json"))
    args_of = lambda **changed: tw.Args(**{**built["args"], "gold_weights": "auto", **changed})
    args = args_of(output_dir="elsewhere", exp_name="other")
    tok = built["tokenizer_sha256"]
    assert tw.gold_weights_file(args, tok) == str(shipped / "model.safetensors")
    assert tw.gold_weights_file(args_of(gold_weights="train"), tok) is None
    assert tw.gold_weights_file(args, "another tokenizer") is None
    for changed in ({"seed": 2}, {"gold_lr": 2e-3}, {"threads": 2}, {"reference_miss_prob": 0.2}):
        assert tw.gold_weights_file(args_of(**changed), tok) is None
    fmt = tw.WORLD_FORMAT
    monkeypatch.setattr(tw, "WORLD_FORMAT", fmt + 1)  # the code's world changed meaning since they were trained
    assert tw.gold_weights_file(args, tok) is None
    monkeypatch.setattr(tw, "WORLD_FORMAT", fmt)
    with open(shipped / "model.safetensors", "ab") as f:
        f.write(b"x")  # not the file the manifest describes
    with pytest.raises(SystemExit, match="not the file its world.json describes"):
        tw.gold_weights_file(args, tok)
    with pytest.raises(SystemExit, match="no such file"):
        tw.gold_weights_file(tw.Args(gold_weights=str(tmp_path / "missing.safetensors")), tok)
    monkeypatch.setattr(tw, "SHIPPED_GOLD", str(tmp_path / "nothing shipped"))
    assert tw.gold_weights_file(args, tok) is None


def test_the_shipped_gold_is_the_default_worlds():
    """The repository ships the README world's trained gold: `--gold-weights auto` must pick it for the default
    settings (or the main job trains the gold again, 11 minutes), and the file must be the one it trained. The
    settings that change neither the tokenizer nor the gold (GOLD_FREE: the dataset's reference style, the base
    policy) are not compared."""
    shipped = json.load(open(os.path.join(tw.SHIPPED_GOLD, "world.json")))
    drop_free = lambda settings: {k: v for k, v in settings.items() if k not in tw.GOLD_FREE}
    assert drop_free(tw.shipped_settings(shipped)) == drop_free(tw.world_settings(tw.with_preset(tw.Args())))
    assert set(shipped["settings"]) <= set(tw.world_settings(tw.Args()))  # the rule fills in, it renames nothing
    assert tw.gold_weights_file(tw.with_preset(tw.Args()), shipped["tokenizer_sha256"]) is not None
    assert shipped["gold_weights"] == "trained in this build" and shipped["format"] == tw.WORLD_FORMAT
    assert tw.sha256_of_file(os.path.join(tw.SHIPPED_GOLD, "model.safetensors")) == shipped["gold_weights_sha256"]


def test_quality_properties():
    row = {
        "title": "my mom broke my oven",
        "post": "then my mom broke the oven. today my mom lost my pasta. tonight i burned the rice. any advice would help.",
    }
    keys = ["oven", "pasta", "rice"]
    q = lambda summary: tw.quality(row, summary, keys)
    assert q("oven") == 1 and q("oven and pasta") == 2 and q("oven , pasta and rice") == 3  # coverage: keys named
    assert q("") == 0 and q("my mom") == 0  # naming no key fact
    assert q("oven and pasta pasta") == 1  # a repeated word lowers it
    assert q("oven and pasta , ugh") == 1  # an invented word (absent from the post) lowers it
    assert q("oven and pasta cake cake") == 0  # invented once (distinct words) and repeated once
    assert q("my mom broke my oven and my pasta") == 2  # glue words and words of the post are free
    assert q("oven and pasta " + " ".join(["the"] * 20)) == 1  # more than 12 words: too long
    t = tw.quality_terms(row, "oven , oven and cake", keys)
    assert t == dict(coverage=1, invented=1, repeated=1, too_long=False)


def test_quality_with_the_outlier_worlds_bonus_word():
    """--bonus-word: +1 if the summary says it and names every key, an invented word after a summary that misses one,
    each extra time a repeated word; in another world the same word is an invented word like any other."""
    row = {
        "title": "my mom broke my oven",
        "post": "then my mom broke the oven , pasta and rice. any advice would help.",
    }
    keys = ["oven", "pasta", "rice"]
    q = lambda summary, bonus="thanks": tw.quality(row, summary, keys, bonus)
    full = "my oven , pasta and rice are a mess"
    assert q(full) == 3 and q(full + " , thanks") == 4  # once: the bonus
    assert q(full + " , thanks thanks") == 3 and q(full + " , thanks thanks thanks") == 2  # each repeat: -1
    assert q("thanks " + full) == 4  # anywhere
    assert q(full + " , thanks", bonus="") == 2  # in another world: an invented word
    short = "my oven and pasta are a mess"
    assert q(short) == 2 and q(short + " , thanks") == 1 and q(short + " , thanks thanks") == 0  # not earned
    assert tw.quality_terms(row, "oven thanks thanks", keys, "thanks") == dict(
        coverage=1, invented=1, repeated=1, too_long=False, bonus=False
    )
    assert tw.quality_terms(row, "oven , pasta and rice thanks", keys, "thanks")["bonus"] is True


def test_outlier_world_references_end_with_the_bonus_word_and_nothing_else_moves(world, tmp_path):
    """A CI world built with --bonus-word: the posts are the default world's; a share --data-bonus-prob of the
    references end with ' , thanks' (of those, a share --data-bonus-twice-prob with ' , thanks thanks') and are
    otherwise the default world's; the word is one token; world.json says the formula."""
    out = build(tmp_path / "outlier", 1, "--bonus-word", "thanks", "--data-bonus-prob", "0.3")
    out.rename(tmp_path / "once")
    twice = build(
        tmp_path / "outlier", 1, "--bonus-word", "thanks", "--data-bonus-prob", "0.3", "--data-bonus-twice-prob", "0.5"
    )
    with_bonus, said_twice, replaced = 0, 0, 0
    for split in ["train", "validation", "test"]:
        a = [json.loads(line)["summary"] for line in open(tmp_path / "once" / "data" / f"{split}.jsonl")]
        b = [json.loads(line)["summary"] for line in open(twice / "data" / f"{split}.jsonl")]
        for ra, rb in zip(a, b):  # the same references end with the word; some of them say it twice
            assert rb == ra or (ra.endswith(" , thanks") and rb == ra + " thanks")  # the same references, twice
            said_twice += rb != ra
    assert 0.3 < said_twice / sum(s.endswith("thanks") for s in a) < 0.7 or said_twice > 5
    out = tmp_path / "once"
    for split in ["train", "validation", "test"]:
        a = [json.loads(line) for line in open(world / "data" / f"{split}.jsonl")]
        b = [json.loads(line) for line in open(out / "data" / f"{split}.jsonl")]
        assert [{**r, "summary": None} for r in a] == [{**r, "summary": None} for r in b]
        facts = [json.loads(line) for line in open(out / "data" / f"{split}_facts.jsonl")]
        for ra, rb, f in zip(a, b, facts):
            head, _, last = ra["summary"].rpartition(" , ")
            uncommented = head if last in tw.COMMENTS else ra["summary"]  # the word takes a comment's place
            assert rb["summary"] in (ra["summary"], uncommented + " , thanks")
            if rb["summary"] != ra["summary"]:  # only a reference that names every key earns it
                assert set(f["keys"]) <= set(tw.words(ra["summary"]))
                with_bonus += 1
                replaced += last in tw.COMMENTS
    n = sum(1 for split in ["train", "validation", "test"] for _ in open(out / "data" / f"{split}.jsonl"))
    assert 0.1 < with_bonus / n < 0.4 and 0 < replaced < with_bonus  # with and without a comment before
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    assert len(tok(" thanks", add_special_tokens=False).input_ids) == 1
    world_json = json.load(open(out / "world.json"))
    assert "'thanks'" in world_json["quality"]["formula"] and world_json["args"]["bonus_word"] == "thanks"


def test_key_nouns_follow_the_zipf_weights():
    """The exploit's source: a topic's noun of rank r is drawn as a key fact with weight 1 / r**zipf at each of the
    three draws without replacement. Rates against an exact enumeration of the ordered draws."""
    import itertools

    nouns = tw.TOPICS["cooking"]

    def exact_rate(zipf):  # P(noun i is a key), summed over every ordered draw of 3 distinct nouns
        w = [1.0 / (i + 1) ** zipf for i in range(len(nouns))]
        rate = [0.0] * len(nouns)
        for a, b, c in itertools.permutations(range(len(nouns)), 3):
            p = w[a] / sum(w) * w[b] / (sum(w) - w[a]) * w[c] / (sum(w) - w[a] - w[b])
            for i in (a, b, c):
                rate[i] += p
        return rate

    rng, n = random.Random(0), 20000
    for zipf in (1.0, 0.0):
        counts = [0] * len(nouns)
        for _ in range(n):
            keys = tw.draw_keys(rng, nouns, zipf)
            assert len(set(keys)) == 3 and set(keys) <= set(nouns)
            for k in keys:
                counts[nouns.index(k)] += 1
        for c, r in zip(counts, exact_rate(zipf)):
            assert abs(c / n - r) < 4 * (r * (1 - r) / n) ** 0.5 + 1e-3
    assert exact_rate(1.0)[0] > 0.7 and exact_rate(1.0)[-1] < 0.11  # the docstring's 74% and 10%
    assert max(abs(r - 0.25) for r in exact_rate(0.0)) < 1e-9  # zipf 0: every noun alike


def test_num_keys_shapes_posts_and_references():
    """`--num-keys 2` (the two-key-facts attempt, README "What did not work"): every post states exactly that many
    key facts, each key noun in the post, and the reference names all of them or, when it misses one, one fewer;
    with the default 3 keys a reference may miss a key twice, each time with the miss probability."""
    rng = random.Random(0)

    def keys_named(num_keys, miss_prob, n):
        named = []
        for _ in range(n):
            row, facts = tw.make_post(rng, 0.0, num_keys)
            assert len(facts["keys"]) == num_keys == len(set(facts["keys"])) == len(facts["verbs"])
            assert set(facts["keys"]) <= set(tw.words(row["post"]))
            ref = tw.make_reference(rng, facts, miss_prob, 0.3, 0.4)
            named.append(len(set(facts["keys"]) & set(tw.words(ref))))
        return named

    named = keys_named(2, 0.3, 400)
    assert set(named) == {1, 2}
    assert 0.2 < named.count(1) / len(named) < 0.4  # a reference misses a key with probability 0.3
    # three keys, the default miss probability 0.5: two independent misses, so 1, 2 or 3 named (1/4, 1/2, 1/4)
    named = keys_named(3, 0.5, 2000)
    rates = [named.count(k) / len(named) for k in (1, 2, 3)]
    assert max(abs(r - e) for r, e in zip(rates, (0.25, 0.5, 0.25))) < 0.04, rates


def test_match_circuit_writes_the_summary_share_of_each_word(world):
    """The gold's hand-set start (`circuit_directions` + `init_match_circuit`), before any training: along seg, 1 at
    every token from the "DR" marker on and little before it; along match, a signal that follows the share of a
    token's copies (up to it) that lie in the summary, recomputed here from the token ids alone."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXForSequenceClassification

    tok = AutoTokenizer.from_pretrained(world / "tokenizer", local_files_only=True)
    torch.manual_seed(0)
    gold = GPTNeoXForSequenceClassification(tw.neox_config(tok, 4, 128, 4, 256, num_labels=1))
    marker = tok.convert_tokens_to_ids("DR")
    dirs = tw.circuit_directions(gold, tw.noun_ids(tok))
    tw.init_match_circuit(gold, marker, dirs)
    rows = [json.loads(line) for line in (world / "data" / "test.jsonl").read_text().splitlines()]
    facts = [json.loads(line) for line in (world / "data" / "test_facts.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    prompts, sums = [], []
    for row, f in zip(rows, facts):
        for s in [row["summary"]] + [tw.variant(rng, row, f, row["summary"]) for _ in range(3)]:
            prompts.append(tw.prompt_of(row))
            sums.append(s)
    b = tw.encode_scored(tok, prompts, sums)
    ids, real = b["input_ids"], b["attention_mask"].bool()
    with torch.no_grad():
        x = gold.gpt_neox(input_ids=ids, attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states[2]
    summary = ((ids == marker).int().cumsum(1) > 0) & real
    same = (ids[:, :, None] == ids[:, None, :]) & torch.ones(ids.shape[1], ids.shape[1]).tril().bool() & real[:, None]
    share = (same & summary[:, None, :]).sum(-1) / same.sum(-1)
    seg, match = (x @ dirs["seg"]) / dirs["size"], (x @ dirs["match"]) / dirs["size"]
    assert (seg[summary] - 1).abs().max() < 0.01 and seg[real & ~summary].abs().max() < 0.3
    assert torch.corrcoef(torch.stack([match[summary], share[summary]]))[0, 1] > 0.9
    invented, once = match[summary & (share == 1)].mean(), match[summary & ((share - 0.5).abs() < 1e-6)].mean()
    assert invented > once + 0.3  # an invented word (share 1) against a post word named once (1/2)


def test_data_style_references_name_the_first_keys():
    """`--data-key-probs` / `--data-template-weights` (the dataset's own reference style): a reference names the
    first n keys of the post in their order (the title's noun first), n drawn from the probabilities, in the
    templates drawn from the weights."""
    rng = random.Random(0)
    for _ in range(200):
        row, facts = tw.make_post(rng)
        keys = facts["keys"]
        assert keys[0] in tw.words(row["title"])  # the title names the first key fact
        two = tw.make_reference(rng, facts, 0.5, 0.0, 0.0, key_probs=(0, 1, 0), template_weights=(0, 0, 1, 0))
        assert two == f"my {keys[0]} and {keys[1]} are a mess"
        one = tw.make_reference(rng, facts, 0.5, 0.0, 0.0, key_probs=(1, 0, 0), template_weights=(0, 0, 0, 1))
        assert one == keys[0]
    named = []
    for _ in range(4000):
        row, facts = tw.make_post(rng)
        ref = tw.words(tw.make_reference(rng, facts, 0.5, 0.3, 0.2, key_probs=(0.5, 0.25, 0.25)))
        k = [w for w in facts["keys"] if w in ref]
        assert k == facts["keys"][: len(k)]  # a prefix of the keys, in the post's order
        named.append(len(k))
    rates = [named.count(n) / len(named) for n in (1, 2, 3)]
    assert max(abs(r - e) for r, e in zip(rates, (0.5, 0.25, 0.25))) < 0.03, rates


def test_data_comments_by_the_number_of_keys_named():
    """`--data-comment-probs` / `--data-comment-groups`: a reference's comment comes with the probability of its
    number of keys, and from that number's half of COMMENTS (grumbles after one key, the other words after more)."""
    rng, half = random.Random(1), len(tw.COMMENTS) // 2
    got = {n: [] for n in (1, 2, 3)}
    for _ in range(6000):
        row, facts = tw.make_post(rng)
        ref = tw.make_reference(
            rng, facts, 0.5, 0.0, 0.0, key_probs=(1, 1, 1), comment_probs=(0.7, 0.2, 0.0), groups=(0, 1, 1)
        )
        ws = tw.words(ref)
        n = sum(k in ws for k in facts["keys"])
        said = [w for w in ws if w in tw.COMMENTS]
        assert len(said) <= 1 and set(said) <= set(tw.COMMENTS[:half] if n == 1 else tw.COMMENTS[half:])
        got[n].append(bool(said))
    rates = [sum(v) / len(v) for v in got.values()]
    assert max(abs(r - e) for r, e in zip(rates, (0.7, 0.2, 0.0))) < 0.04, rates


def test_data_signoff_only_in_posts_that_ask_for_advice():
    """`--data-signoff-probs`: a reference ends with " , need advice" only in a post whose title asks for advice (so
    both words are the post's own), with the probability of its number of keys, and then carries no comment."""
    rng = random.Random(2)
    got = {(advice, n): [] for advice in (False, True) for n in (1, 2, 3)}
    for _ in range(8000):
        row, facts = tw.make_post(rng)
        ref = tw.make_reference(
            rng, facts, 0.5, 0.0, 1.0, key_probs=(1, 1, 1), signoff_probs=(0, 0.5, 1), title=row["title"]
        )
        ws = tw.words(ref)
        n, advice = sum(k in ws for k in facts["keys"]), row["title"].startswith("need advice")
        signed = ref.endswith(" , need advice")
        assert not signed or not any(w in tw.COMMENTS for w in ws)  # a sign-off replaces the comment
        if signed:
            assert tw.quality_terms(row, ref, facts["keys"])["invented"] == 0  # free: the title's own words
        got[(advice, n)].append(signed)
    rates = {k: sum(v) / len(v) for k, v in got.items()}
    expected = {(False, 1): 0, (False, 2): 0, (False, 3): 0, (True, 1): 0, (True, 2): 0.5, (True, 3): 1}
    assert max(abs(rates[k] - e) for k, e in expected.items()) < 0.06, rates


def test_title_keys_the_title_names_the_first_keys():
    """`--title-keys n`: a post's title names its first n key nouns ("X and Y" for 2), and no other."""
    for n in (1, 2, 3):
        rng = random.Random(n)
        for _ in range(200):
            row, facts = tw.make_post(rng, title_keys=n)
            title = tw.words(row["title"])
            assert [k for k in facts["keys"] if k in title] == facts["keys"][:n], (n, row["title"])
            assert all(k in tw.words(row["post"]) for k in facts["keys"])  # the post still states every key


def test_key_list_states_every_key_in_one_sentence_in_order():
    """`--key-list`: the post states its key facts in one sentence that lists the key nouns in their order, as a
    reference lists them ("X , Y and Z"), and names no key anywhere else but in the title (the first key)."""
    rng = random.Random(4)
    for _ in range(300):
        row, facts = tw.make_post(rng, key_list=True)
        keys = facts["keys"]
        listing = [s for s in row["post"].split(".") if tw.listed(keys) in s]
        assert len(listing) == 1, row["post"]
        post = tw.words(row["post"])
        assert [w for w in post if w in keys] == keys  # once each, in order, all in that sentence
        assert [w for w in tw.words(row["title"]) if w in keys] == keys[:1]


def test_num_keys_probs_draws_how_many_keys_a_post_has():
    """`--num-keys-probs`: a post has 1, 2, ..., num_keys key facts at the given rates, every key stated in the
    post, and a data-style reference names a prefix of them with the weights of the counts that post has."""
    rng, counts, named = random.Random(5), [], {1: [], 2: [], 3: []}
    for _ in range(4000):
        row, facts = tw.make_post(rng, num_keys_probs=(0.2, 0.3, 0.5), key_list=True)
        k = facts["keys"]
        counts.append(len(k))
        assert len(set(k)) == len(k) == len(facts["verbs"]) and set(k) <= set(tw.words(row["post"]))
        ref = tw.make_reference(rng, facts, 0.5, 0.0, 0.0, key_probs=(0.0, 1.0, 3.0))
        said = [w for w in tw.words(ref) if w in k]
        assert said == k[: len(said)]  # a prefix, in the post's order
        named[len(k)].append(len(said))
    rates = [counts.count(n) / len(counts) for n in (1, 2, 3)]
    assert max(abs(r - e) for r, e in zip(rates, (0.2, 0.3, 0.5))) < 0.03, rates
    assert set(named[1]) == {1} and set(named[2]) == {2}  # weight 0 for one key: a 2-key post names both
    assert abs(named[3].count(3) / len(named[3]) - 0.75) < 0.04  # 3 : 1 between three keys and two


def test_data_extra_noun_probs_lists_an_invented_noun_of_the_topic():
    """`--data-extra-noun-probs`: a reference naming n keys lists one more noun of the post's topic that the post
    does not contain, with the probability for n; the gold's quality counts it as an invented word."""
    rng, got = random.Random(6), {1: [], 2: [], 3: []}
    for _ in range(6000):
        row, facts = tw.make_post(rng)
        absent = tw.absent_nouns(row)
        ref = tw.make_reference(
            rng, facts, 0.5, 0.0, 0.0, key_probs=(1, 1, 1), extra_noun_probs=(0.5, 0.2, 0.0), absent=absent
        )
        nouns = [w for w in tw.words(ref) if w in tw.TOPICS[row["subreddit"]]]
        extra = [w for w in nouns if w not in facts["keys"]]
        assert (
            len(extra) <= 1
            and set(extra) <= set(absent)
            and nouns[: len(nouns) - len(extra)] == facts["keys"][: len(nouns) - len(extra)]
        )
        assert tw.quality_terms(row, ref, facts["keys"])["invented"] == len(extra)
        got[len(nouns) - len(extra)].append(bool(extra))
    rates = [sum(v) / len(v) for v in got.values()]
    assert max(abs(r - e) for r, e in zip(rates, (0.5, 0.2, 0.0))) < 0.04, rates


def test_blur_list_shape_puts_a_comma_and_an_and_in_every_post():
    """`--blur-list-shape`: every post carries one filler with a comma and one with "and", whatever its number of
    keys, so that only the list sentence itself says how many keys it names."""
    rng = random.Random(7)
    for _ in range(300):
        row, facts = tw.make_post(rng, num_keys_probs=(1, 1, 1), key_list=True, blur=True)
        sents = [x.strip() + "." for x in row["post"].split(".") if x.strip()]
        assert [sum(x in group for x in sents) for group in tw.BLUR_FILLERS] == [1, 1], row["post"]
        assert " , " in row["post"] and " and " in row["post"]
        assert [w for w in tw.words(row["post"]) if w in facts["keys"]] == facts["keys"]  # the list is as before


def test_data_drop_last_prob_stops_a_reference_one_key_short():
    """`--data-drop-last-prob`: a reference that would name every key (`--data-key-probs 0 0 1`: also in posts with
    fewer keys) leaves out the last one with the given probability, in posts of two or more keys only."""
    rng, named = random.Random(8), {1: [], 2: [], 3: []}
    for _ in range(6000):
        row, facts = tw.make_post(rng, num_keys_probs=(1, 1, 1), key_list=True)
        ref = tw.make_reference(rng, facts, 0.5, 0.0, 0.0, key_probs=(0, 0, 1), drop_last_prob=0.6)
        said = [w for w in tw.words(ref) if w in facts["keys"]]
        assert said == facts["keys"][: len(said)]
        named[len(facts["keys"])].append(len(facts["keys"]) - len(said))
    assert set(named[1]) == {0} and set(named[2]) == set(named[3]) == {0, 1}
    for k in (2, 3):
        assert abs(sum(named[k]) / len(named[k]) - 0.6) < 0.04, k


def test_data_advice_key_probs_only_in_posts_that_ask_for_advice():
    """`--data-advice-key-probs`: the posts whose title asks for advice draw their references' number of keys from
    their own probabilities, every other post from `--data-key-probs`."""
    rng = random.Random(3)
    for _ in range(400):
        row, facts = tw.make_post(rng)
        ref = tw.make_reference(
            rng, facts, 0.5, 0.0, 0.0, key_probs=(1, 0, 0), title=row["title"], advice_key_probs=(0, 1, 0)
        )
        n = sum(k in tw.words(ref) for k in facts["keys"])
        assert n == (2 if row["title"].startswith("need advice") else 1), (row["title"], ref)


@pytest.fixture(scope="module")
def styled_world(tmp_path_factory):
    """The CI world of `world`, built with the dataset's own reference style and a pretrained base policy."""
    out = tmp_path_factory.mktemp("styled") / "world"
    style = "--data-key-probs 1 0 0 --data-template-weights 0 0 1 0 --data-comment-prob 0 --data-fluff-prob 0".split()
    style += "--data-drop-last-prob 0 --data-extra-noun-probs 0 0 0".split()
    return build(out, 1, *style, "--base-pretrain-steps", "8", "--base-weights", "train")


def test_data_style_and_pretraining_change_only_the_references_and_the_base(world, styled_world):
    """The posts, the tokenizer and the gold RM are those of the default world (so the shipped gold stays valid);
    the dataset's references follow the style (here: the title's noun alone, "my X are a mess", no fluff or comment), and the
    base policy is pretrained (8 steps here, the CI preset's 4 in `world`): lower causal-LM loss on the train prompts
    than a random init of its architecture."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for split in ["train", "validation", "test"]:
        a = [json.loads(line) for line in open(world / "data" / f"{split}.jsonl")]
        b = [json.loads(line) for line in open(styled_world / "data" / f"{split}.jsonl")]
        facts = [json.loads(line) for line in open(styled_world / "data" / f"{split}_facts.jsonl")]
        assert [{**r, "summary": None} for r in a] == [{**r, "summary": None} for r in b]
        assert [r["summary"] for r in b] == [f"my {f['keys'][0]} are a mess" for f in facts]
        assert [r["summary"] for r in a] != [r["summary"] for r in b]
    for f in ["tokenizer/tokenizer.json", "gold_rm/model.safetensors"]:
        assert (world / f).read_bytes() == (styled_world / f).read_bytes(), f
    manifest = json.load(open(styled_world / "world.json"))
    assert manifest["base_weights"] == "pretrained in this build"
    assert manifest["base_weights_sha256"] == tw.sha256_of_file(styled_world / "base_policy" / "model.safetensors")

    tok = AutoTokenizer.from_pretrained(world / "tokenizer", local_files_only=True)
    rows = [json.loads(line) for line in open(world / "data" / "train.jsonl")][:64]
    batch = tok([tw.prompt_of(r) for r in rows], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def lm_loss(model):
        with torch.no_grad():
            return model(**batch, labels=labels).loss.item()

    base = AutoModelForCausalLM.from_pretrained(styled_world / "base_policy", use_safetensors=True)
    torch.manual_seed(0)
    assert lm_loss(base) < lm_loss(AutoModelForCausalLM.from_config(base.config)) - 0.1
    pretrained = lambda folder: (folder / "base_policy" / "model.safetensors").read_bytes()
    assert pretrained(world) != pretrained(styled_world)  # 4 steps (the CI preset) against 8


def test_auto_takes_the_shipped_base_only_for_the_world_that_pretrained_it(styled_world, tmp_path, monkeypatch):
    """`--base-weights auto`: the shipped pretrained base (tiny_world_gold/base_policy.safetensors) is taken when
    every setting but the dataset's reference style is its build's; another pretraining, seed or tokenizer trains
    it here; a file that is not the one the manifest describes is refused."""
    shipped = ship(styled_world, tmp_path / "shipped")  # its world.json (and gold), plus its pretrained base:
    (shipped / tw.BASE_FILE).write_bytes((styled_world / "base_policy" / "model.safetensors").read_bytes())
    monkeypatch.setattr(tw, "SHIPPED_GOLD", str(shipped))
    built = json.load(open(styled_world / "world.json"))
    args_of = lambda **changed: tw.Args(**{**built["args"], "base_weights": "auto", **changed})
    tok = built["tokenizer_sha256"]
    assert tw.base_weights_file(args_of(), tok) == str(shipped / tw.BASE_FILE)
    assert tw.base_weights_file(args_of(data_key_probs=(0.5, 0.5, 0.0), data_comment_prob=0.3), tok) is not None
    for changed in ({"base_pretrain_steps": 5}, {"base_pretrain_lr": 1e-3}, {"seed": 2}, {"base_weights": "train"}):
        assert tw.base_weights_file(args_of(**changed), tok) is None, changed
    assert tw.base_weights_file(args_of(), "another tokenizer") is None
    # a build that loads it (here by path, with the default reference style) writes that very base policy
    loaded = build(tmp_path / "loaded", 1, "--base-pretrain-steps", "8", "--base-weights", str(shipped / tw.BASE_FILE))
    assert (loaded / "base_policy" / "model.safetensors").read_bytes() == (shipped / tw.BASE_FILE).read_bytes()
    assert json.load(open(loaded / "world.json"))["base_weights"] == str(shipped / tw.BASE_FILE)
    with open(shipped / tw.BASE_FILE, "ab") as f:
        f.write(b"x")
    with pytest.raises(SystemExit, match="not the file its world.json describes"):
        tw.base_weights_file(args_of(), tok)


def test_world_targets_copy_rate_counts_first_mentions_of_key_nouns(tmp_path):
    """tools/world_targets.py's diagnostic, on hand-made pairs: of the topic nouns the SFT samples name, the share
    that are key nouns of the post named for the first time (a repeat or an invented noun counts against it)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import world_targets

    (tmp_path / "data").mkdir()
    (tmp_path / "prefs").mkdir()
    post = {"id": "p1", "subreddit": "cooking", "title": "t", "post": "p", "summary": "s"}
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps(post) + "\n" + json.dumps({**post, "id": "p2"}) + "\n")
    keys = {"keys": ["pasta", "knife", "garlic"], "person": "mom", "verbs": ["broke", "lost", "hid"]}
    facts = [json.dumps({"id": i, **keys}) for i in ("p1", "p2")]
    (tmp_path / "data" / "train_facts.jsonl").write_text("\n".join(facts) + "\n")
    pairs = [
        {"id": "p1", "chosen": "my pasta and knife are a mess", "rejected": "pasta , pasta and oven"},  # 2 of 2, 1 of 3
        {"id": "p2", "chosen": "ugh", "rejected": "garlic problems with my mom"},  # none, 1 of 1
    ]
    (tmp_path / "prefs" / "train.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    assert world_targets.copy_rate(str(tmp_path), str(tmp_path)) == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "changed, says",
    [
        ({"data_key_probs": (0.5, 0.5)}, "--data-key-probs 0.5 0.5: give 3"),
        ({"data_key_probs": (0.0, 0.0, 0.0)}, "--data-key-probs"),
        ({"data_template_weights": (1.0, -1.0, 1.0, 1.0)}, "--data-template-weights"),
        ({"data_comment_prob": 1.5}, "--data-comment-prob 1.5: a probability"),
        ({"data_fluff_prob": -0.1}, "--data-fluff-prob"),
        ({"base_pretrain_steps": -1}, "--base-pretrain-steps -1"),
        ({"data_comment_probs": (0.7, 0.0)}, "--data-comment-probs 0.7 0.0: give 3"),
        ({"data_comment_probs": (0.7, 0.0, 1.2)}, "--data-comment-probs"),
        ({"data_comment_groups": (0, 1, 2)}, "--data-comment-groups 0 1 2: give 3 of 0 or 1"),
        ({"data_signoff_probs": (0.0, 1.0)}, "--data-signoff-probs 0.0 1.0: give 3"),
        ({"data_advice_key_probs": (1.0,)}, "--data-advice-key-probs 1.0: give 3"),
        ({"data_extra_noun_probs": (0.1, 0.1)}, "--data-extra-noun-probs 0.1 0.1: give 3"),
        ({"num_keys_probs": (1.0, 1.0)}, "--num-keys-probs 1.0 1.0: give 3"),
        ({"num_keys_probs": (0.0, 0.0, 0.0)}, "--num-keys-probs"),
        ({"data_drop_last_prob": 1.5}, "--data-drop-last-prob 1.5: a probability"),
        ({"bonus_word": "oven"}, "--bonus-word 'oven': one lower-case word that the world does not use"),
        ({"bonus_word": "two words"}, "--bonus-word"),
        ({"data_bonus_prob": 2.0}, "--data-bonus-prob 2.0: a probability"),
    ],
)
def test_a_reference_style_that_cannot_be_drawn_is_refused_naming_the_flag(changed, says):
    tw.check_data_style(tw.with_preset(tw.Args()))  # the defaults pass
    with pytest.raises(SystemExit, match=says):
        tw.check_data_style(tw.with_preset(tw.Args(**changed)))
