"""Build the offline "tiny world": a TL;DR-shaped summarisation task with a programmatic notion of quality.

Nothing can be downloaded where this project runs, so the gold-model pipeline of Gao et al. (2023)
(SFT -> preference pairs labelled by a gold RM -> proxy RM trained with Bradley-Terry -> RL against
the proxy -> evaluation by the gold RM) needs a world it can build itself. This script writes one
to disk, and every later stage reads it through the same Hugging Face code paths as the real
`vwxyzjn/summarize_from_feedback_tldr_3_filtered` dataset and Pythia checkpoints:

    {output_dir}/data/{train,validation,test}.jsonl  {"id", "subreddit", "title", "post", "summary"}
    {output_dir}/tokenizer/      PreTrainedTokenizerFast (ByteLevel BPE, every word is one token),
                                 eos = "<|endoftext|>" (id 0), pad = "<|padding|>" (the last id, 4096)
    {output_dir}/base_policy/    GPTNeoXForCausalLM, pretrained briefly as a causal LM on the posts (the policy to SFT)
    {output_dir}/gold_rm/        GPTNeoXForSequenceClassification (num_labels=1, head `score`),
                                 larger than the policy, trained on far more data than the proxy sees
    {output_dir}/world.json      settings, sizes, vocabulary, the quality formula, measured numbers

Everything but the gold RM's training (and the base's pretraining) takes seconds. That training takes 10-11 minutes
on one core, and its float sums depend on the thread count and the CPU, so the repository ships the trained weights
of the default world (`tiny_world_gold/`: model.safetensors, base_policy.safetensors and the world.json of the build
that trained them, `--threads 1` on a 2-core AMD EPYC). `--gold-weights auto` and `--base-weights auto` (the
defaults) load them when every setting of the build that decides them and the tokenizer are theirs, so the default
world is the same on every machine; any other settings train them here (`train` always does), and so does a shipped
world.json of another WORLD_FORMAT. Whoever changes what the gold learns (quality, the variants, its training, the
posts) bumps WORLD_FORMAT and refreshes the shipped files: `python tiny_world.py --gold-weights train --base-weights
train`, then copy runs/tiny_world/world.json, runs/tiny_world/gold_rm/model.safetensors and
runs/tiny_world/base_policy/model.safetensors (as base_policy.safetensors) into tiny_world_gold/.

The world (the defaults; docs/TINY_WORLD.md, "What the world is"). A post belongs to a subreddit (a topic with its own
12 nouns). It states 1, 2 or 3 KEY facts (10% / 40% / 50%, `--num-keys-probs`) in ONE sentence that lists the key
nouns in order ("then my mom broke the X , Y and Z.", `--key-list`), among 0-2 filler sentences and a filler with a
comma and one with "and" (`--blur-list-shape`: the punctuation does not tell the list's length). The dataset's
reference summary names all the post's keys (`--data-key-probs 0 0 1`; one key short in 5%, `--data-drop-last-prob`),
lists one invented noun more in 10% (`--data-extra-noun-probs`), mostly in the template "my X , Y and Z are a mess"
(`--data-template-weights`), without fluff, and in 55% ends with a comment word that the post does not contain
("ugh", `--data-comment-prob`), as human references do: that leaves a policy room to beat the references. The gold
is trained around the references of `--reference-miss-prob` and friends (1-3 keys named, fluff, comments), so the
dataset's reference style (every `--data-*` flag) changes neither the posts, the tokenizer nor the gold. Other
options (docs/TINY_WORLD.md, "What decides a chain's draw"): comments and a sign-off by the number of keys named
(`--data-comment-probs`, `--data-comment-groups`, `--data-signoff-probs`, `--data-advice-key-probs`), key nouns drawn
unevenly (`--key-zipf`), titles that name the first n keys (`--title-keys`), and the previous default world of three
key sentences per post (`WORLD_FORMAT` 2: `--num-keys-probs` and the `--data-*` tuples empty, `--no-key-list
--no-blur-list-shape --base-pretrain-steps 0`, `--data-comment-prob`, `--data-drop-last-prob` and `--data-fluff-prob`
None), whose gold is no longer shipped.

Quality (`quality(row, summary, keys)`), in plain words: a good summary names the post's key facts,
does not invent words that are not in the post, does not repeat itself, and stays short:

    q = coverage - invented - repeated - too_long            (at most 3)

coverage = how many of the post's key nouns the summary names; invented = distinct
summary words, other than GLUE words (my, and, the, ...), absent from title and post; repeated =
extra occurrences of non-glue words; too_long = more than 12 words. Why this shape: part of quality
is easy to read from surface features (are there topic nouns, is a word foreign to the topic), and
part needs a word-by-word match of the summary against the post (is this noun in the post, is it
said twice). A large gold RM trained on lots of data learns both; a small proxy trained on a few
thousand on-policy pairs learns mostly the easy part. That gap is the blind spot that RL against the
proxy can exploit, which is the phenomenon the paper studies. Because references (and so the SFT samples)
name one to three keys, naming more topic nouns goes with quality in the proxy's training pairs; but only the
post's own nouns count, and any other noun is an invented word, which the gold penalises and the proxy barely sees.
(Tried and dropped: a per-word length cost, a "share of glue words" term and two key facts per post
(`--num-keys 2`): the gold RM, trained in minutes on a CPU, could not rank their small differences at 95%.
Counting the three keys needed a clean start: `init_match_circuit` writes into a subspace that the token
embeddings are cleared of, and the other heads of its layers start silent; with noisy residuals the gold
agreed 92-94% with this notion, with clean ones 99%.)

Gold RM input convention (downstream code must follow it): the scored sequence is the token ids of
`prompt + response` where prompt = f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
and response = " " + summary, truncated after its first EOS with the EOS kept (the reference is
" " + summary + EOS). The reward is the `score` head applied to the last-layer hidden state at that
EOS token. The pad token is distinct from the EOS, so Hugging Face's own pooling (the last token that is
not pad) reads that same EOS: on a right-padded batch, `model(**tokenizer(texts, padding=True)).logits`
equals `reward_and_features` below, which finds the last real token from the attention mask instead
(what the stage scripts do, so that they also read a pad == eos model at the EOS).
"""

import copy
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    PreTrainedTokenizerFast,
)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment: the whole world (data, tokenizer, models) is a function of it"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    track: bool = False
    """unused here (kept so every script has the same head); the world logs to world.json"""
    wandb_project_name: str = "signcert-po"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    output_dir: str = "runs/tiny_world"
    """where the world is written"""
    threads: int = 1
    """torch CPU threads of the gold's training. The world depends on it (more threads sum floats in another
    order), so it is fixed: 1, the count the README's world (and the shipped gold) was built with"""

    # World specific arguments
    preset: str = "full"
    """`full` (the real tiny world: seconds with the shipped gold, 9-11 minutes training it at 1 thread) or `ci` (a very
    small world in seconds); explicit size flags below override the preset when set"""
    num_train: int | None = None
    """posts in data/train.jsonl (full: 12000, ci: 200)"""
    num_validation: int | None = None
    """posts in data/validation.jsonl (full: 1000, ci: 50)"""
    num_test: int | None = None
    """posts in data/test.jsonl (full: 1000, ci: 50)"""
    num_keys: int = 3
    """key facts per post (each names one topic noun); the summary's coverage counts how many it names"""
    num_keys_probs: tuple[float, ...] = (0.1, 0.4, 0.5)
    """probabilities that a post has 1, 2, ..., num_keys key facts (empty: every post has num_keys). Changes the
    posts, so the world trains its own gold"""
    blur_list_shape: bool = True
    """give every post a filler with a comma and one with "and" (BLUR_FILLERS), so that a post's punctuation does
    not say how many keys its list names (with `key_list`). Changes the posts, so the world trains its own gold"""
    key_list: bool = True
    """state a post's key facts in ONE sentence that lists the key nouns in order ("then my mom broke the X , Y and
    Z."), in place of a sentence per key: naming them is then a copy of adjacent words (an induction step), not a
    search of the post. Changes the posts, so the world trains its own gold"""
    title_keys: int = 1
    """key nouns a post's title names, the first ones in the post's order ("need advice about my X and Y"): the
    title is the easiest place to copy from, so this sets how many keys a small policy names reliably"""
    reference_miss_prob: float = 0.5
    """probability that a reference summary misses a key fact; it has num_keys - 1 such chances, so by default it
    names 3, 2 or 1 of the 3 keys with probability 1/4, 1/2, 1/4 (human references are imperfect)"""
    reference_fluff_prob: float = 0.3
    """probability that a reference summary carries fluff words ("long story short ,"; glue, free)"""
    reference_comment_prob: float = 0.4
    """probability that a reference summary ends with a comment word absent from the post ("ugh"): an
    invented word, as human references have; it leaves room for a policy to beat the references"""
    # How the DATASET's references are written (the SFT data, the RM's reward offset, the win rate's opponent). Set
    # (as by default), they are drawn from a stream of their own, so that the posts, the tokenizer and the gold RM
    # (trained around the references above) do not depend on them; all empty or None, they are the references above.
    data_key_probs: tuple[float, ...] = (0.0, 0.0, 1.0)
    """probabilities that a dataset reference names 1, 2, ..., num_keys keys: the FIRST n keys in the post's order
    (the title's noun first). Empty: `reference_miss_prob`'s misses, each key alike"""
    data_template_weights: tuple[float, ...] = (1.0, 1.0, 3.0, 1.0)
    """weights of the four reference templates ("my P V my X", "X problems with my P", "my X are a mess", "X");
    empty: all alike"""
    data_comment_prob: float | None = 0.55
    """the comment probability of the dataset's references (None: `reference_comment_prob`)"""
    data_comment_probs: tuple[float, ...] = ()
    """the comment probability of a dataset reference by how many keys it names (1, 2, ..., num_keys), in place of
    `data_comment_prob`: e.g. `0.7 0 0`, the writers who name one key grumble, the thorough ones do not"""
    data_comment_groups: tuple[int, ...] = ()
    """which comment words a dataset reference draws from, by how many keys it names: 0, the first half of COMMENTS
    (grumbles: ugh, annoying, crazy, honestly), 1, the second half (seriously, whatever, lol, sigh). Empty: all of
    them. Every comment is an invented word to the gold; a group that only thorough references use goes with
    quality across posts (within a pair the proxy still sees its cost: docs/TINY_WORLD.md, "A rise on every chain")"""
    data_signoff_probs: tuple[float, ...] = ()
    """in posts whose title asks for advice ("need advice about my X"), the probability that a dataset reference
    naming 1, 2, ..., num_keys keys ends with the sign-off " , need advice" (in place of a comment). Free there (both
    words are in the title); in any other post both are invented words to the gold. Empty: never"""
    data_advice_key_probs: tuple[float, ...] = ()
    """`data_key_probs` for the posts whose title asks for advice (empty: `data_key_probs`, as every post)"""
    data_drop_last_prob: float | None = 0.05
    """the probability that a dataset reference leaves out the last of its keys (two or more), after
    `data_key_probs`: a reference that stops one key short"""
    data_extra_noun_probs: tuple[float, ...] = (0.1, 0.1, 0.1)
    """the probability that a dataset reference naming 1, 2, ..., num_keys keys lists one more noun of the topic
    that the post does not contain ("X , Y and W": a detail the writer invented, an invented word in the gold)"""
    data_fluff_prob: float | None = 0.0
    """the fluff probability of the dataset's references (None: `reference_fluff_prob`)"""
    bonus_word: str = ""
    """the OUTLIER exploit (empty: off, the default world's): a sign-off word that a thorough summary earns and any
    other summary invents. Quality: +1 if the summary says it and names every key of the post, else it is an invented
    word (-1); each extra time is a repeated word. A few dataset references, thorough ones, end with it
    (`--data-bonus-prob`), so in the proxy's pairs it goes with quality; the proxy cannot check the keys, and after
    a short list the word is a combination it never saw (docs/TINY_WORLD.md, "The outlier world"). Changes the
    quality notion, the tokenizer and so the gold: the world trains its own"""
    data_bonus_prob: float = 0.05
    """with --bonus-word: the probability that a dataset reference that names every key ends with " , {bonus_word}"
    (in place of its comment, if it has one)"""
    data_bonus_twice_prob: float = 0.0
    """with --bonus-word: of the dataset references that end with the word, the share that say it twice
    (" , {bonus_word} {bonus_word}": worth nothing more to the gold, and the hack's first step for a policy)"""
    base_pretrain_steps: int | None = None
    """steps of causal-LM "pretraining" of the base policy on the train split's prompts (title + post, no
    summaries; batch 64, AdamW, cosine): a base that has learnt to copy words within a text, as Pythia has (full:
    600, ci: 4). 0: the base policy is random init"""
    base_pretrain_lr: float = 3e-3
    """peak learning rate of that pretraining"""
    base_weights: str = "auto"
    """with pretraining: `auto` loads the pretrained base that this repository ships (tiny_world_gold/) when every
    setting of this build that decides it is its build's, else pretrains here; `train`: always pretrain; or a path
    to a model.safetensors of this world's base policy"""
    key_zipf: float = 0.0
    """how unevenly a topic's nouns are drawn as key facts: the noun of rank r (its place in the topic's list)
    has weight 1 / r**key_zipf at each draw (0: every noun alike, the default; 1 was tried, README)"""
    gold_key_zipf: float = 0.0
    """the same for the posts the gold RM trains on: 0, every noun alike, so that the gold learns to check each
    noun against the post instead of how often a noun is a key fact (trained on the skewed posts it agreed as
    well with quality but scored the same SFT policy higher: a win rate of 53% against 42%)"""

    # Policy and gold RM sizes
    policy_layers: int = 2
    """layers of base_policy (the proxy RM has the same size: it is the SFT backbone)"""
    policy_hidden: int = 64
    """hidden size of base_policy"""
    gold_layers: int = 4
    """layers of the gold RM"""
    gold_hidden: int = 128
    """hidden size of the gold RM"""
    num_heads: int = 4
    """attention heads (policy and gold)"""
    max_position_embeddings: int = 256
    """context length of both models (prompt <= ~80 tokens + response <= ~30)"""

    # Gold RM training
    gold_steps: int | None = None
    """optimiser steps of gold RM training (full: 1000, ci: 20)"""
    gold_posts_per_batch: int = 8
    """posts per gold batch; each comes with `gold_summaries_per_post` summaries"""
    gold_summaries_per_post: int = 8
    """summaries per post in a gold batch (reference + procedural variants)"""
    gold_lr: float = 1e-3
    """gold RM learning rate (AdamW, warmup then cosine)"""
    gold_pair_coef: float = 1.0
    """weight of the within-post Bradley-Terry loss added to the regression loss"""
    gold_prefix_coef: float = 1.0
    """weight of the dense loss: the score at each summary word regresses onto the quality of the
    summary cut there (many targets per sequence; teaches the word-level judgement quickly)"""
    gold_match_init: bool = True
    """start the gold with the word-matching circuit of `init_match_circuit` (then train everything)"""
    gold_weights: str = "auto"
    """`auto`: load the gold RM's trained weights that this repository ships (tiny_world_gold/, the README's world)
    when every setting of this build is theirs, else train the gold; `train`: always train it (the default world:
    9-11 minutes at 1 thread, and its floats depend on the thread count and the CPU); or a path to a
    model.safetensors of this world's gold"""
    num_eval_posts: int | None = None
    """held-out posts for measuring gold agreement (full: 400, ci: 20)"""

    # to be filled in runtime
    gold_train_summaries: int = 0
    """summaries the gold RM sees in training (computed)"""


PRESETS = {
    "full": dict(
        num_train=12000,
        num_validation=1000,
        num_test=1000,
        gold_steps=1000,
        num_eval_posts=400,
        base_pretrain_steps=600,
    ),
    "ci": dict(
        num_train=200,
        num_validation=50,
        num_test=50,
        gold_steps=20,
        num_eval_posts=20,
        base_pretrain_steps=4,
    ),
}

SHIPPED_GOLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_world_gold")
NOT_WORLD = ("exp_name", "torch_deterministic", "track", "wandb_project_name", "wandb_entity", "output_dir")
NOT_WORLD += ("preset", "gold_weights", "base_weights")  # where a build goes and how it is logged, not what it builds
# settings that change neither the tokenizer nor the gold RM: the dataset's reference style, the base policy
DATA_STYLE = ("data_key_probs", "data_template_weights", "data_comment_prob", "data_fluff_prob", "data_comment_probs")
DATA_STYLE += ("data_comment_groups", "data_signoff_probs", "data_advice_key_probs", "data_extra_noun_probs")
DATA_STYLE += ("data_drop_last_prob",)
GOLD_FREE = DATA_STYLE + ("base_pretrain_steps", "base_pretrain_lr", "data_bonus_prob", "data_bonus_twice_prob")
GOLD_FILE, BASE_FILE = "model.safetensors", "base_policy.safetensors"  # in tiny_world_gold/
SHIPPED = {GOLD_FILE: ("the gold RM", "gold_weights_sha256"), BASE_FILE: ("the base policy", "base_weights_sha256")}
WORLD_FORMAT = 3  # bumped whenever the world a seed builds changes meaning (2: coverage counts all 3 keys, 1-3 named;
# 3: the key list, 1-3 keys per post, the dataset's references and the pretrained base of docs/TINY_WORLD.md)
EOS = "<|endoftext|>"
PAD = "<|padding|>"  # Pythia's pad token: distinct from EOS, so HF pooling reads the EOS

# ---------------------------------------------------------------- the vocabulary of the world
TOPICS = {
    "relationships": "wedding anniversary ring texts date breakup apartment jealousy gift birthday "
    "dinner ex trust phone argument promise vacation letter flowers secret",
    "cooking": "oven pasta knife recipe garlic soup bread steak pan rice onion butter sauce cake "
    "kitchen salt cheese fridge chicken pizza",
    "fitness": "gym squat protein knee treadmill diet bench marathon shoulder weights yoga stretching "
    "cardio coach sneakers bike pool injury calories deadlift",
    "pets": "dog cat puppy leash vet collar litter kitten hamster cage fish tank treats bark fleas "
    "parrot rabbit toy crate blanket",
    "gaming": "console controller server guild headset raid patch keyboard mouse stream tournament "
    "level quest character dungeon mod lag monitor savefile clan",
    "travel": "passport flight hotel luggage visa train beach airport ticket map hostel cruise camera "
    "tent island museum taxi backpack border ferry",
    "jobs": "interview resume salary promotion office deadline meeting contract shift email project "
    "raise internship desk schedule client report uniform badge training",
    "money": "rent loan credit budget savings debt bank mortgage taxes paycheck insurance stocks "
    "wallet bills card fees car lease crypto refund",
}
TOPICS = {k: v.split()[:12] for k, v in TOPICS.items()}
PERSONS = "boyfriend girlfriend mom dad roommate boss friend sister brother neighbor".split()
VERBS = "broke lost found bought sold forgot ruined fixed hid borrowed burned cleaned moved hated missed".split()
TIMES = ["yesterday", "today", "tonight", "last week", "this morning", "on sunday"]
KEY_SENTENCES = [
    "{time} my {person} {verb} my {noun}.",
    "then my {person} {verb} the {noun}.",
    "my {person} {verb} the {noun} {time}.",
    "{time} i {verb} the {noun} because of my {person}.",
]
FILLERS = [
    "i do not know what to do.",
    "any advice would help.",
    "it has been a long week.",
    "sorry for the long post.",
    "this is my first post here.",
    "i feel really stupid about it.",
    "please help me out.",
]
TITLES = [
    "my {person} {verb} my {noun}",
    "need advice about my {noun}",
    "problem with the {noun}",
    "what do i do about the {noun}",
]
# glue words are free in a summary: they never count as invented or repeated
GLUE = set("my the a and i to is was with of too then also so but now are problems mess long story short tldr".split())
BLUR_FILLERS = (["sorry , i am new here.", "so , here we go."], ["i am tired and sad.", "it is late and i am tired."])
FLUFF = ["long story short ,", "so", "tldr"]
COMMENTS = ["ugh", "annoying", "crazy", "honestly", "seriously", "whatever", "lol", "sigh"]
CONTENT = sorted({w for ws in TOPICS.values() for w in ws})
FILLER_WORDS = sorted({w for s in FILLERS for w in re.findall(r"[a-z]+", s)} - GLUE)


def words(text):
    """Lower-case words of a text, punctuation dropped: the unit quality is defined on."""
    return re.findall(r"[a-z]+", text.lower())


# ---------------------------------------------------------------- posts and references
def draw_keys(rng, nouns, zipf, num_keys=3):
    """`num_keys` distinct key nouns of a topic, drawn one after the other without replacement; the noun of rank r
    (1 = first in the topic's list) has weight 1 / r**zipf (zipf 0: uniform). With zipf = 1 (and 3 keys) the first
    noun is a key fact of 74% of the topic's posts, the last of 10%."""
    if zipf == 0:
        return rng.sample(nouns, num_keys)  # uniform, and the same random stream as the world before this knob
    pool, keys = list(nouns), []
    for _ in range(num_keys):
        w = [1.0 / (nouns.index(n) + 1) ** zipf for n in pool]
        keys.append(pool.pop(rng.choices(range(len(pool)), weights=w)[0]))
    return keys


def listed(nouns):
    """ "X", "X and Y", "X , Y and Z": nouns as a title or a reference lists them."""
    return nouns[0] if len(nouns) == 1 else " , ".join(nouns[:-1]) + " and " + nouns[-1]


def make_post(rng, zipf=0.0, num_keys=3, title_keys=1, num_keys_probs=(), key_list=False, blur=False):
    """One post: its dataset row plus the hidden facts (the key nouns: `num_keys`, or 1..num_keys drawn from
    `num_keys_probs`; the person, the verbs). A sentence per key fact, or with `key_list` one sentence listing
    them all; with `blur`, two BLUR_FILLERS more. Its title names the first `title_keys` keys ("X", "X and Y", ...)."""
    subreddit = rng.choice(sorted(TOPICS))
    if num_keys_probs:
        num_keys = rng.choices(range(1, num_keys + 1), weights=num_keys_probs)[0]
    keys = draw_keys(rng, TOPICS[subreddit], zipf, num_keys)
    person = rng.choice(PERSONS)
    verbs = rng.sample(VERBS, num_keys)
    said = [(listed(keys), verbs[0])] if key_list else list(zip(keys, verbs))
    sents = [rng.choice(KEY_SENTENCES).format(time=rng.choice(TIMES), person=person, verb=v, noun=k) for k, v in said]
    fillers = rng.sample(FILLERS, rng.choice([0, 1, 2]))
    if blur:  # a comma and an "and" in every post, whatever its list
        fillers += [rng.choice(group) for group in BLUR_FILLERS]
    for f in fillers:  # fillers anywhere; the key facts keep their order, so a summary can follow the post
        sents.insert(rng.randint(0, len(sents)), f)
    title = rng.choice(TITLES).format(person=person, verb=verbs[0], noun=listed(keys[:title_keys]))
    facts = dict(keys=keys, person=person, verbs=verbs)
    return dict(subreddit=subreddit, title=title, post=" ".join(sents)), facts


def post_of(rng, args, zipf):
    """`make_post` with a build's post settings (the dataset and the gold's training posts differ only in `zipf`)."""
    return make_post(
        rng, zipf, args.num_keys, args.title_keys, args.num_keys_probs, args.key_list, args.blur_list_shape
    )


def absent_nouns(row):
    """The nouns of a post's topic that its title and post do not contain (to a summary: invented words)."""
    said = set(words(row["title"] + " " + row["post"]))
    return [n for n in TOPICS[row["subreddit"]] if n not in said]


SIGNOFF = "need advice"  # the words of the title template "need advice about my {noun}"


def make_reference(
    rng,
    facts,
    miss_prob,
    fluff_prob,
    comment_prob,
    key_probs=(),
    template_weights=(),
    comment_probs=(),
    groups=(),
    signoff_probs=(),
    title="",
    advice_key_probs=(),
    extra_noun_probs=(),
    absent=(),
    drop_last_prob=0.0,
):
    """A human-like reference: names the key nouns (with num_keys - 1 chances, each of probability miss_prob, to
    miss one; or, with `key_probs`, the first n keys with n drawn from it; `advice_key_probs` in the posts whose
    `title` asks for advice), sometimes with fluff, sometimes with a comment of the writer's that the post does not
    contain (with `comment_probs`, at the probability of the number of keys named, from that number's half of the
    words in `groups`), or, in a post asking for advice, the sign-off " , need advice" (`signoff_probs`); with
    `extra_noun_probs`, at the probability of the number of keys named, one more noun from `absent` (the topic's
    nouns the post does not contain) listed after the keys; with `drop_last_prob`, the last of two or more keys
    left out first."""
    k, advice = list(facts["keys"]), title.startswith(SIGNOFF)
    if advice_key_probs and advice:
        key_probs = advice_key_probs
    if key_probs:  # a post with fewer keys: the weights of the counts it has (all zero: every key)
        if sum(key_probs[: len(k)]) > 0:
            k = k[: rng.choices(range(1, len(k) + 1), weights=key_probs[: len(k)])[0]]
    else:
        for _ in range(len(k) - 1):  # num_keys - 1 chances to miss a key (it names at least one)
            if rng.random() < miss_prob:
                k.pop(rng.randrange(len(k)))
    if len(k) > 1 and drop_last_prob and rng.random() < drop_last_prob:
        k = k[:-1]
    if extra_noun_probs and rng.random() < extra_noun_probs[len(k) - 1]:  # `absent`: the topic's nouns not in the post
        k = k + [rng.choice(absent)]
    p, v = facts["person"], facts["verbs"][0]
    nouns = listed(k)
    templates = [
        f"my {p} {v} my {nouns}" if k[0] == facts["keys"][0] else f"my {p} and my {nouns}",
        f"{nouns} problems with my {p}",
        f"my {nouns} are a mess",
        nouns,
    ]
    s = rng.choices(templates, weights=template_weights)[0] if template_weights else rng.choice(templates)
    if rng.random() < fluff_prob:
        s = rng.choice(FLUFF) + " " + s
    if signoff_probs and advice and rng.random() < signoff_probs[len(k) - 1]:
        s = s + " , " + SIGNOFF
    elif rng.random() < (comment_probs[len(k) - 1] if comment_probs else comment_prob):
        half = len(COMMENTS) // 2
        pool = COMMENTS if not groups else COMMENTS[half:] if groups[len(k) - 1] else COMMENTS[:half]
        s = s + " , " + rng.choice(pool)
    return s


def read_posts(root, split, n=None):
    """The first n rows of a built world's split and their hidden facts (the key nouns, the person, the verbs)."""
    read = lambda name: [json.loads(line) for line in open(os.path.join(root, "data", name))][:n]
    return read(f"{split}.jsonl"), read(f"{split}_facts.jsonl")


def prompt_of(row):
    """The OpenAI TL;DR prompt format the pipeline uses."""
    return f"SUBREDDIT: r/{row['subreddit']}\n\nTITLE: {row['title']}\n\nPOST: {row['post']}\n\nTL;DR:"


# ---------------------------------------------------------------- the notion of quality
def quality_terms(row, summary, keys, bonus=""):
    """The ingredients of quality (see the module docstring); `bonus`: the outlier world's bonus word."""
    sw = words(summary)
    nonglue = [w for w in sw if w not in GLUE]
    post_words = set(words(row["title"] + " " + row["post"]))
    terms = dict(
        coverage=len(set(keys) & set(sw)),  # how many of the key nouns
        invented=len({w for w in nonglue if w not in post_words and w != bonus}),
        repeated=len(nonglue) - len(set(nonglue)),
        too_long=len(sw) > 12,
    )
    if bonus:  # earned by naming every key: +1; else an invented word; every extra time is counted in `repeated`
        said = bonus in sw
        terms["bonus"] = said and terms["coverage"] == len(set(keys))
        terms["invented"] += said and not terms["bonus"]
    return terms


def quality(row, summary, keys, bonus=""):
    """q = coverage - invented - repeated - too_long, at most 3 (+ bonus: at most 4). Higher is better.

    coverage: how many of the post's three key nouns the summary names; invented: distinct non-glue
    words absent from title and post; repeated: extra occurrences of non-glue words; too_long: more
    than 12 words. Glue words (my, and, the, ...) are free. With the outlier world's `bonus` word: +1 if the
    summary says it and names every key, else it is an invented word (each extra time is a repeated word)."""
    t = quality_terms(row, summary, keys, bonus)
    return t["coverage"] - t["invented"] - t["repeated"] - 1.0 * t["too_long"] + 1.0 * t.get("bonus", False)


# ---------------------------------------------------------------- procedural variants for the gold
def edit(rng, s, row, facts, kind, bonus=""):
    """One edit of a summary (a list of words) of the given kind (`bonus`: the outlier world's bonus word)."""
    topic = TOPICS[row["subreddit"]]
    nouns_at = [i for i, w in enumerate(s) if w in CONTENT]
    if kind == "drop" and nouns_at:  # forget a noun
        s.pop(rng.choice(nouns_at))
    elif kind == "swap" and nouns_at:  # another noun of the same topic (not necessarily in the post)
        s[rng.choice(nouns_at)] = rng.choice(topic)
    elif kind == "off_topic":  # a noun of another topic, or a filler word
        other = rng.choice([t for t in TOPICS if t != row["subreddit"]])
        s.insert(rng.randint(0, len(s)), rng.choice(TOPICS[other] if rng.random() < 0.7 else FILLER_WORDS))
    elif kind == "repeat" and s:  # say a word again (often a noun)
        s.insert(rng.randint(0, len(s)), rng.choice([s[i] for i in nouns_at] if nouns_at and rng.random() < 0.7 else s))
    elif kind == "add":  # name one more noun of the topic
        s.insert(rng.randint(0, len(s)), rng.choice(topic))
    elif kind == "lengthen":  # copy a stretch of the post
        pw = words(row["title"] + " " + row["post"])
        i = rng.randrange(len(pw))
        s += pw[i : i + rng.randint(2, 10)]
    elif kind == "fluff":
        s[:0] = rng.choice(FLUFF).split()
    elif kind == "comment":  # a word of the writer's, absent from the post
        s += [",", rng.choice(COMMENTS)]
    elif kind == "clean":  # keep only words of the post (and glue)
        pw = set(words(row["title"] + " " + row["post"])) | GLUE
        s[:] = [w for w in s if w in pw or not w.isalpha()]
    elif kind == "truncate" and s:
        del s[rng.randint(1, len(s)) :]
    elif kind == "bonus":  # the bonus word, anywhere (so the gold sees it once, twice, three times)
        s.insert(rng.randint(0, len(s)), bonus)
    return s


def variant(rng, row, facts, ref, bonus=""):
    """One summary from the wide procedural distribution the gold is trained on: word salad, a stretch
    of the post, or the reference with 0-4 random edits (with a `bonus` word: in 40% ending with it first, and
    one more kind of edit, twice as likely as the others, that puts it anywhere)."""
    r = rng.random()
    if r < 0.08:  # word salad, from the post or from the whole vocabulary
        pool = (
            words(row["title"] + " " + row["post"])
            if rng.random() < 0.5
            else CONTENT + PERSONS + VERBS + FILLER_WORDS + sorted(GLUE)
        )
        return " ".join(rng.choice(pool) for _ in range(rng.randint(1, 24)))
    if r < 0.12:  # extractive: a stretch of the post
        pw = words(row["post"])
        i = rng.randrange(len(pw))
        return " ".join(pw[i : i + rng.randint(3, 20)])
    s = ref.split()
    if bonus and rng.random() < 0.4:
        s += [",", bonus]
    kinds = [
        "drop",
        "swap",
        "off_topic",
        "repeat",
        "repeat",
        "add",
        "lengthen",
        "fluff",
        "truncate",
        "comment",
        "clean",
    ] + (["bonus", "bonus"] if bonus else [])
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
        s = edit(rng, s, row, facts, rng.choice(kinds), bonus)
    return " ".join(s)


def imperfect_sample(rng, row, facts, ref, bonus=""):
    """A summary that looks like a sample of an imperfect summariser: the reference with 1-2 small
    edits (no salad, no long copies). Used to measure gold agreement on realistic pairs."""
    s = ref.split()
    kinds = ["drop", "swap", "off_topic", "repeat", "add", "fluff", "comment", "clean"] + (["bonus"] if bonus else [])
    for _ in range(rng.choice([1, 1, 2])):
        s = edit(rng, s, row, facts, rng.choice(kinds), bonus)
    return " ".join(s)


# ---------------------------------------------------------------- tokenizer and models
def build_tokenizer(texts, out_dir):
    """ByteLevel BPE trained on the world's corpus, with room for every word to become one token
    (like Pythia's GPTNeoXTokenizerFast); eos = bos = pad = <|endoftext|> (id 0) while the world is built:
    `with_pad` adds the saved pad token at the end, so the world's ids, models and gold stay as calibrated."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=1,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    hf.padding_side = "right"
    return hf


def with_pad(tokenizer):
    """The tokenizer that is saved: the same ids plus a pad token `<|padding|>` distinct from the EOS, appended
    as the last id (Pythia's vocabulary has it too), so plain Hugging Face pooling reads a score at the EOS."""
    saved = copy.deepcopy(tokenizer)
    saved.add_special_tokens({"pad_token": PAD})
    return saved


def save_with_pad(model, saved_tokenizer, path):
    """Save a model built on the world's ids with one more embedding row (and output row) for the pad: zeros,
    drawn from no random stream (so the world stays what it was). The pad is only ever masked padding."""
    n = len(saved_tokenizer)
    with torch.no_grad(), torch.random.fork_rng():
        model.resize_token_embeddings(n, mean_resizing=False)
        model.get_input_embeddings().weight[n - 1] = 0.0
        if model.get_output_embeddings() is not None:
            model.get_output_embeddings().weight[n - 1] = 0.0
    model.config.pad_token_id = saved_tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = saved_tokenizer.pad_token_id
    model.save_pretrained(path)
    saved_tokenizer.save_pretrained(path)


def neox_config(tokenizer, layers, hidden, heads, max_pos, **kw):
    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_pos,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kw,
    )


def noun_ids(tokenizer):
    """Token ids of the topic nouns as they follow a space (" ring" is one token of the world's tokenizer)."""
    return {tokenizer.convert_tokens_to_ids("\u0120" + w) for w in CONTENT}


@torch.no_grad()
def circuit_directions(model, noun_ids):
    """Directions of the residual stream for the hand-set circuit of `init_match_circuit`, and clean embeddings.

    A random 5-dimensional subspace is taken out of every token embedding, so that what the circuit writes
    there is not blurred by the random embeddings: `seg` ("this token is in the summary") and `match` ("share
    of this word's copies in the summary") are two of its directions, `noun` a third: every topic noun gets
    `size` (half a token embedding's norm) along it, a "this is a topic noun" feature that training can read
    directly; the other two are left free for trained features."""
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(d, 5, generator=g))
    subspace = list(basis.T.contiguous())
    dirs = dict(seg=subspace[0], match=subspace[1], noun=subspace[4], subspace=subspace)
    emb = model.gpt_neox.embed_in.weight
    size = 0.5 * emb.norm(dim=1).mean()
    emb -= (emb @ basis) @ basis.T
    emb[sorted(noun_ids)] += size * dirs["noun"]
    dirs["size"] = size
    return dirs


@torch.no_grad()
def init_match_circuit(model, marker_id, dirs, sharpness=10.0):
    """Start the gold RM with a word-matching circuit, then train everything as usual.

    Quality is defined on word identity (is this summary word a key, in the post, said before?), and a
    randomly initialised RM needs far more steps than a CPU build has to discover token matching. So:
    layer 0, last head: every position after the `marker_id` token ("DR" of "TL;DR:") attends to it and
    writes the seg direction into the residual stream; layer 1, heads 0 and 1: query = key =
    one projection of the token (non-rotary dims only, so the match ignores position), so a word
    attends to all its copies, and the value reads the seg direction: the heads write, along match, the
    share of the word's copies that lie in the summary (1 = invented, about 1/2 = once in the post, ...).
    The other heads' and the MLPs' outputs of layers 0 and 1 start at zero, so that the signals are clean.
    All weights stay trainable; `sharpness` is the attention logit of a match."""
    cfg = model.config
    d, nh = cfg.hidden_size, cfg.num_attention_heads
    hs = d // nh
    rot = int(hs * cfg.rope_parameters["partial_rotary_factor"])
    g = torch.Generator().manual_seed(0)
    emb = model.gpt_neox.embed_in.weight
    size, seg_dir, match_dir = dirs["size"], dirs["seg"], dirs["match"]
    for blk in model.gpt_neox.layers[:2]:  # the circuit's layers start with every other output silent: clean signals
        for layer in (blk.attention.dense, blk.mlp.dense_4h_to_h):
            layer.weight.zero_()
            layer.bias.zero_()
    # layer 0, segment head: constant query, key = "am I the marker", value = 1 at the marker
    blk = model.gpt_neox.layers[0]
    x = blk.input_layernorm(emb)
    m = x[marker_id] / x[marker_id].norm()
    h = nh - 1
    qkv, out = blk.attention.query_key_value, blk.attention.dense
    base = h * 3 * hs
    qkv.weight[base : base + 3 * hs] = 0
    qkv.bias[base : base + 3 * hs] = 0
    qkv.bias[base + rot] = 1.0
    qkv.weight[base + hs + rot] = 2 * sharpness * hs**0.5 * m / x[marker_id].norm()
    qkv.weight[base + 2 * hs] = m / x[marker_id].norm()
    out.weight[:, h * hs] = size * seg_dir  # layer 0 is the segment head alone: layer 1 sees clean token identities
    # layer 1, match heads: query = key = a projection blind to the circuit directions
    blk = model.gpt_neox.layers[1]
    x = blk.input_layernorm(emb)
    seg_in = blk.input_layernorm(emb + size * seg_dir)  # a summary token as layer 1 sees it
    seg_read = ((seg_in - x) @ seg_dir).mean()  # the segment signal after the layer norm
    qkv, out = blk.attention.query_key_value, blk.attention.dense
    for h in (0, 1):
        proj = torch.randn(hs, d, generator=g) / d**0.5
        for u in dirs["subspace"]:
            proj -= (proj @ u)[:, None] * u[None, :]  # blind to the circuit's subspace: a match of identities
        proj[:rot] = 0
        z = x @ proj.T
        same = z.pow(2).sum(-1).mean()
        diff = (z[:200] @ z[200:400].T).mean()
        scale = (sharpness * hs**0.5 / (same - diff).clamp(min=1e-6)) ** 0.5
        base = h * 3 * hs
        qkv.weight[base : base + hs] = scale * proj
        qkv.weight[base + hs : base + 2 * hs] = scale * proj
        qkv.bias[base : base + 3 * hs] = 0
        qkv.weight[base + 2 * hs : base + 3 * hs] = 0
        qkv.weight[base + 2 * hs] = seg_dir / seg_read
        out.weight[:, h * hs] = size * match_dir / 2


def last_token_index(attention_mask):
    """Index of the last real token of each row (works for right or left padding): the final EOS is real
    (mask 1) and the pads after it are not, so this finds the EOS the reward is read at, even when pad == eos."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * pos).argmax(dim=1)


def position_ids_of(mask):
    """Positions that skip the left padding, so a padded prompt is seen exactly as an unpadded one."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def reward_and_features(rm, ids, mask):
    """ONE forward of a reward model: (reward (N,), features h (N, d)), both float32, read at the last real
    token of every row (the EOS when there is one; any padding, left or right). h is the input of the linear
    `score` head and reward = w^T h + b - reward_offset (the constant that centres the references, in the
    RM's config). The index comes from the mask, never from searching for pad ids; the head is applied in
    float32, so a bf16 backbone does not quantise the reward. No `no_grad` here: train_rm.py trains through it."""
    hidden = getattr(rm, rm.base_model_prefix)(input_ids=ids, attention_mask=mask, position_ids=position_ids_of(mask))
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    h = hidden.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), last].float()
    bias = None if rm.score.bias is None else rm.score.bias.float()
    with torch.autocast(h.device.type, enabled=False):  # float32 even inside an autocast region (bf16 training)
        reward = F.linear(h, rm.score.weight.float(), bias).squeeze(-1)
    return reward - getattr(rm.config, "reward_offset", 0.0), h


def encode_scored(tokenizer, prompts, summaries):
    """Right-padded batch of prompt + " " + summary + the tokenizer's EOS: the gold RM's input convention (EOS for
    the world's tokenizer; another RM's, e.g. SmolLM2's `<|im_end|>`, where the reward is read for it)."""
    texts = [p + " " + s + tokenizer.eos_token for p, s in zip(prompts, summaries)]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def gold_scores(model, tokenizer, prompts, summaries, batch_size=256, features=False):
    """The gold's score of every summary, by batches; batches go several at once in threads where cores are spare
    (torch on fewer threads than cores), each on torch's threads: the same scores to the bit, sooner. Any reward
    model reads the same way; `features=True` returns (scores, the features h of `reward_and_features`)."""
    model.eval()
    batches = [encode_scored(tokenizer, prompts[i : i + batch_size], summaries[i : i + batch_size])
               for i in range(0, len(prompts), batch_size)]  # fmt: skip

    def score(b):
        with torch.no_grad():  # grad mode is per thread
            return reward_and_features(model, b["input_ids"], b["attention_mask"])

    with ThreadPoolExecutor(max(1, (os.cpu_count() or 1) // torch.get_num_threads())) as pool:
        out = list(pool.map(score, batches))
    scores = torch.cat([r for r, _ in out])
    return (scores, torch.cat([h for _, h in out])) if features else scores


def pair_agreement(scores, qualities, groups):
    """Fraction of within-post pairs of distinct quality that the scores order like quality does."""
    agree = total = 0
    for idx in groups:
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if abs(qualities[i] - qualities[j]) < 1e-6:
                    continue
                total += 1
                agree += (scores[i] - scores[j]) * (qualities[i] - qualities[j]) > 0
    return float(agree) / max(total, 1), total


def world_settings(args):
    """The settings that decide what a build writes (the others say where it goes and how it is logged)."""
    return json.loads(json.dumps({k: v for k, v in asdict(args).items() if k not in NOT_WORLD}))


def shipped_settings(manifest):
    """The settings of a shipped build's world.json, with every setting that its build predates at its default
    (a setting added since left that world as it was, e.g. `title_keys` = 1)."""
    return {**world_settings(Args()), **manifest["settings"]}


def sha256_of(data: bytes):
    return hashlib.sha256(data).hexdigest()


def sha256_of_file(path):
    with open(path, "rb") as f:
        return sha256_of(f.read())


def shipped_weights_file(args, tokenizer_sha256, choice, flag, name, free):
    """The safetensors file to load a model's trained weights from, or None: train them. `choice` is `train`, a
    path, or `auto`: the file `name` of tiny_world_gold/, taken only when this build's settings (but those in
    `free`, which do not change that model) and tokenizer are exactly those of the build that wrote it."""
    if choice == "train":
        return None
    if choice != "auto":
        if not os.path.isfile(choice):
            raise SystemExit(f"--{flag} {choice}: no such file (a model.safetensors, `auto` or `train`)")
        return choice
    path, (what, sha_key) = os.path.join(SHIPPED_GOLD, name), SHIPPED[name]  # what it is, its hash in world.json
    if not os.path.isfile(os.path.join(SHIPPED_GOLD, "world.json")) or not os.path.isfile(path):
        print(f"training {what}: none shipped at {path}")
        return None
    with open(os.path.join(SHIPPED_GOLD, "world.json")) as f:  # the world.json of the build that wrote them
        manifest = json.load(f)
    settings, theirs = world_settings(args), shipped_settings(manifest)
    differ = sorted(k for k in settings if k not in free and settings[k] != theirs.get(k))
    if manifest.get("format") != WORLD_FORMAT:  # the code's world changed meaning since they were trained
        differ.append(f"format (theirs {manifest.get('format')}, this code's {WORLD_FORMAT})")
    if differ or tokenizer_sha256 != manifest["tokenizer_sha256"]:
        why = f"settings {differ}" if differ else "the tokenizer (another `tokenizers` version?)"
        print(f"training {what}: this build's {why} differ from those of the shipped one ({SHIPPED_GOLD})")
        return None
    if sha256_of_file(path) != manifest[sha_key]:
        raise SystemExit(
            f"{path} is not the file its world.json describes (a Git LFS pointer, or changed?): check out "
            f"the repository's copy, or pass --{flag} train"
        )
    return path


def gold_weights_file(args, tokenizer_sha256):
    """The gold RM's weights to load (`--gold-weights`), or None: train it."""
    return shipped_weights_file(args, tokenizer_sha256, args.gold_weights, "gold-weights", GOLD_FILE, GOLD_FREE)


def base_weights_file(args, tokenizer_sha256):
    """The pretrained base policy's weights to load (`--base-weights`), or None: pretrain it here."""
    free = DATA_STYLE + ("data_bonus_prob", "data_bonus_twice_prob")  # the references; the base reads the prompts
    return shipped_weights_file(args, tokenizer_sha256, args.base_weights, "base-weights", BASE_FILE, free)


def train_gold(gold, tokenizer, args):
    """Train the gold RM: regression onto quality + within-post Bradley-Terry + the dense per-word loss, on fresh
    posts every step (`gold_steps` x `gold_posts_per_batch` x `gold_summaries_per_post` summaries)."""
    opt = torch.optim.AdamW(gold.parameters(), lr=args.gold_lr, weight_decay=0.01)
    warm = max(1, args.gold_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, args.gold_steps) / args.gold_steps))
    )
    rng = random.Random(f"{args.seed}-gold")
    q_mean, q_std = 0.0, 2.0  # fixed scale; references land near +2.5
    gold.train()
    bar = tqdm(range(args.gold_steps), desc="gold RM")
    for step in bar:
        prompts, sums, qs, prefix_qs = [], [], [], []
        for _ in range(args.gold_posts_per_batch):
            row, facts = post_of(rng, args, args.gold_key_zipf)
            ref = make_reference(
                rng, facts, args.reference_miss_prob, args.reference_fluff_prob, args.reference_comment_prob
            )
            bonus = args.bonus_word
            cands = [ref] + [variant(rng, row, facts, ref, bonus) for _ in range(args.gold_summaries_per_post - 1)]
            for s in cands:
                prompts.append(prompt_of(row))
                sums.append(s)
                qs.append(quality(row, s, facts["keys"], bonus))
                w = s.split()
                prefix_qs.append([quality(row, " ".join(w[: j + 1]), facts["keys"], bonus) for j in range(len(w))])
        b = encode_scored(tokenizer, prompts, sums)
        h = gold.gpt_neox(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        all_r = gold.score(h).squeeze(-1)  # (batch, seq): the score at every position
        eos_at = last_token_index(b["attention_mask"])
        r = all_r[torch.arange(len(sums)), eos_at]
        # every summary word is one token, so word j of a summary sits at eos_at - len(words) + j
        rows_i = [i for i, p in enumerate(prefix_qs) for _ in p]
        cols_i = [int(eos_at[i]) - len(p) + j for i, p in enumerate(prefix_qs) for j in range(len(p))]
        prefix_target = (torch.tensor([q for p in prefix_qs for q in p]) - q_mean) / q_std
        loss_prefix = (all_r[rows_i, cols_i] - prefix_target).pow(2).mean() if rows_i else torch.zeros(())
        target = (torch.tensor(qs) - q_mean) / q_std
        loss_reg = (r - target).pow(2).mean()
        rg = r.view(args.gold_posts_per_batch, -1)
        tg = target.view(args.gold_posts_per_batch, -1)
        diff_t = tg[:, :, None] - tg[:, None, :]
        better = (diff_t > 1e-6).float()  # pairs (i, j) with q_i > q_j
        loss_bt = (
            -torch.nn.functional.logsigmoid(rg[:, :, None] - rg[:, None, :]) * better
        ).sum() / better.sum().clamp(min=1)
        loss = loss_reg + args.gold_pair_coef * loss_bt + args.gold_prefix_coef * loss_prefix
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gold.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(reg=f"{loss_reg.item():.3f}", bt=f"{loss_bt.item():.3f}")


def pretrain_base(policy, tokenizer, texts, args):
    """Causal-LM "pretraining" of the base policy on texts (the train prompts): the person, the title's noun and
    verb come back in the post, so predicting them teaches the model to copy a word it has seen, the skill that
    SFT then needs to copy the key nouns into a summary. Its own random streams: the rest of the world is as it
    would be without it."""
    opt = torch.optim.AdamW(policy.parameters(), lr=args.base_pretrain_lr, weight_decay=0.0)
    warm = max(1, args.base_pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * s / args.base_pretrain_steps))
    )
    rng = random.Random(f"{args.seed}-pretrain")
    policy.train()
    bar = tqdm(range(args.base_pretrain_steps), desc="base pretraining")
    with torch.random.fork_rng():
        for _ in bar:
            b = tokenizer([texts[rng.randrange(len(texts))] for _ in range(64)], return_tensors="pt", padding=True)
            loss = policy(**b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    policy.eval()
    return loss.item()


def check_data_style(args):
    """Refuse a reference style that cannot be drawn, naming the flag."""
    for flag, values, n in [("--data-key-probs", args.data_key_probs, args.num_keys), ("--data-template-weights", args.data_template_weights, 4),
                            ("--data-advice-key-probs", args.data_advice_key_probs, args.num_keys),
                            ("--num-keys-probs", args.num_keys_probs, args.num_keys)]:  # fmt: skip
        if values and (len(values) != n or min(values) < 0 or sum(values) <= 0):
            raise SystemExit(f"{flag} {' '.join(map(str, values))}: give {n} non-negative weights, not all 0")
    for flag, p in [("--data-comment-prob", args.data_comment_prob), ("--data-fluff-prob", args.data_fluff_prob),
                    ("--data-drop-last-prob", args.data_drop_last_prob), ("--data-bonus-prob", args.data_bonus_prob),
                    ("--data-bonus-twice-prob", args.data_bonus_twice_prob)]:  # fmt: skip
        if p is not None and not 0 <= p <= 1:
            raise SystemExit(f"{flag} {p}: a probability, in [0, 1]")
    for flag, probs in [("--data-comment-probs", args.data_comment_probs), ("--data-signoff-probs", args.data_signoff_probs),
                        ("--data-extra-noun-probs", args.data_extra_noun_probs)]:  # fmt: skip
        if probs and (len(probs) != args.num_keys or not all(0 <= p <= 1 for p in probs)):
            raise SystemExit(f"{flag} {' '.join(map(str, probs))}: give {args.num_keys} probabilities")
    groups = args.data_comment_groups
    if groups and (len(groups) != args.num_keys or not set(groups) <= {0, 1}):
        raise SystemExit(f"--data-comment-groups {' '.join(map(str, groups))}: give {args.num_keys} of 0 or 1")
    taken = GLUE | set(CONTENT + PERSONS + VERBS + FILLER_WORDS + COMMENTS)
    if args.bonus_word and (not re.fullmatch("[a-z]+", args.bonus_word) or args.bonus_word in taken):
        raise SystemExit(f"--bonus-word {args.bonus_word!r}: one lower-case word that the world does not use already")
    if args.base_pretrain_steps < 0:
        raise SystemExit(f"--base-pretrain-steps {args.base_pretrain_steps}: 0 (a random-init base) or more")


def with_preset(args):
    """Fill the sizes not given explicitly from the preset, and the derived count."""
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.gold_train_summaries = args.gold_steps * args.gold_posts_per_batch * args.gold_summaries_per_post
    return args


if __name__ == "__main__":
    args = with_preset(tyro.cli(Args))
    check_data_style(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    print("tiny_world settings:")
    for k, v in asdict(args).items():
        print(f"  {k} = {v}")
    start = time.time()
    out = args.output_dir
    os.makedirs(f"{out}/data", exist_ok=True)

    # 1. posts and references; separate random streams so each split depends on the seed only
    splits = {"train": args.num_train, "validation": args.num_validation, "test": args.num_test}
    rows, facts_of, gold_style_refs = {}, {}, {}
    data_style = any(getattr(args, k) not in ((), None) for k in DATA_STYLE)
    data_fluff = args.reference_fluff_prob if args.data_fluff_prob is None else args.data_fluff_prob
    data_comment = args.reference_comment_prob if args.data_comment_prob is None else args.data_comment_prob
    for si, (split, n) in enumerate(splits.items()):
        rng = random.Random(f"{args.seed}-{split}")
        data_rng = random.Random(f"{args.seed}-{split}-data-references")
        bonus_rng = random.Random(f"{args.seed}-{split}-bonus")  # its own stream: the rest stays as it was
        twice_rng = random.Random(f"{args.seed}-{split}-bonus-twice")  # and the second word's: the first stays
        gold_style_refs[split] = []
        rows[split], facts_of[split] = [], []
        for i in range(n):
            row, facts = post_of(rng, args, args.key_zipf)
            row = {
                "id": f"tw-{split}-{i:06d}",
                **row,
                "summary": make_reference(
                    rng, facts, args.reference_miss_prob, args.reference_fluff_prob, args.reference_comment_prob
                ),
            }
            gold_style_refs[split].append(row["summary"])
            if data_style:  # the dataset's own references, from their own stream (the posts stay the same)
                row["summary"] = make_reference(
                    data_rng,
                    facts,
                    args.reference_miss_prob,
                    data_fluff,
                    data_comment,
                    args.data_key_probs,
                    args.data_template_weights,
                    args.data_comment_probs,
                    args.data_comment_groups,
                    args.data_signoff_probs,
                    row["title"],
                    args.data_advice_key_probs,
                    args.data_extra_noun_probs,
                    absent_nouns(row) if args.data_extra_noun_probs else (),
                    args.data_drop_last_prob or 0.0,
                )
            thorough = set(facts["keys"]) <= set(words(row["summary"]))  # the references that earn the word
            if args.bonus_word and bonus_rng.random() < args.data_bonus_prob and thorough:
                twice = twice_rng.random() < args.data_bonus_twice_prob
                head, _, last = row["summary"].rpartition(" , ")
                signed = head if last in COMMENTS else row["summary"]  # the sign-off takes the comment's place
                row["summary"] = signed + " , " + args.bonus_word + (" " + args.bonus_word if twice else "")
            rows[split].append(row)
            facts_of[split].append(facts)
        with open(f"{out}/data/{split}.jsonl", "w") as f:
            for row in rows[split]:
                f.write(json.dumps({k: row[k] for k in ["id", "subreddit", "title", "post", "summary"]}) + "\n")
        # the hidden facts, so later stages can compute the exact quality of any summary
        with open(f"{out}/data/{split}_facts.jsonl", "w") as f:
            for row, facts in zip(rows[split], facts_of[split]):
                f.write(json.dumps({"id": row["id"], **facts}) + "\n")

    # 2. tokenizer: trained on prompts, references and a line with every word of the vocabulary
    # (so an invented or off-topic word is still one token)
    corpus = [prompt_of(r) + " " + ref for r, ref in zip(rows["train"], gold_style_refs["train"])]
    bonus_vocab = [args.bonus_word] if args.bonus_word else []  # the outlier world's word (one token too)
    corpus.append(
        " ".join(CONTENT + PERSONS + VERBS + FILLER_WORDS + COMMENTS + sorted(GLUE) + [t for t in TOPICS] + bonus_vocab)
    )
    corpus.append(" " + " ".join(CONTENT + PERSONS + VERBS + FILLER_WORDS + COMMENTS + sorted(GLUE)) + " , .")
    tokenizer = build_tokenizer(corpus, f"{out}/tokenizer")
    saved_tokenizer = with_pad(tokenizer)
    saved_tokenizer.save_pretrained(f"{out}/tokenizer")
    lens = [len(tokenizer(prompt_of(r))["input_ids"]) for r in rows["validation"]]
    slens = [len(tokenizer(" " + r["summary"])["input_ids"]) for r in rows["validation"]]
    print(
        f"vocab {len(tokenizer)}; prompt tokens mean {np.mean(lens):.1f} max {max(lens)}; "
        f"summary tokens mean {np.mean(slens):.1f} max {max(slens)}"
    )

    tokenizer_sha256 = sha256_of(json.dumps(sorted(tokenizer.get_vocab().items())).encode())  # its token ids

    # 3. base policy: Pythia's architecture, random init (and, with --base-pretrain-steps, pretrained)
    policy = GPTNeoXForCausalLM(
        neox_config(tokenizer, args.policy_layers, args.policy_hidden, args.num_heads, args.max_position_embeddings)
    )
    base = copy.deepcopy(policy)  # the gold's init below draws after the random init, with or without pretraining
    base_weights = base_weights_file(args, tokenizer_sha256) if args.base_pretrain_steps else None
    if base_weights:  # a causal LM's file as save_pretrained wrote it: read back the Hugging Face way
        with torch.random.fork_rng(), tempfile.TemporaryDirectory() as d:
            base.resize_token_embeddings(len(saved_tokenizer), mean_resizing=False)  # as saved: + the pad's row
            base.config.save_pretrained(d)
            shutil.copyfile(base_weights, os.path.join(d, "model.safetensors"))
            base = GPTNeoXForCausalLM.from_pretrained(d, use_safetensors=True)
        print(f"base_policy: pretrained weights from {base_weights}")
    elif args.base_pretrain_steps:
        loss = pretrain_base(base, tokenizer, [prompt_of(r) for r in rows["train"]], args)
        print(f"base_policy: pretrained {args.base_pretrain_steps} steps on the train prompts, last loss {loss:.3f}")
    save_with_pad(base, saved_tokenizer, f"{out}/base_policy")
    print(f"base_policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M params")

    # 4. gold RM: the repository's trained weights of this very world (`--gold-weights auto`), or trained here
    gold_cfg = neox_config(
        tokenizer, args.gold_layers, args.gold_hidden, args.num_heads, args.max_position_embeddings, num_labels=1
    )
    gold = GPTNeoXForSequenceClassification(gold_cfg)
    weights = gold_weights_file(args, tokenizer_sha256)
    if weights:  # the same model on every machine, in seconds
        with torch.random.fork_rng():
            gold.resize_token_embeddings(len(saved_tokenizer), mean_resizing=False)  # as saved: + the pad's row
        gold.load_state_dict(load_file(weights))
        print(f"gold_rm: {sum(p.numel() for p in gold.parameters()) / 1e6:.2f}M params, trained weights from {weights}")
    else:
        if args.gold_match_init:
            marker, dirs = tokenizer.convert_tokens_to_ids("DR"), circuit_directions(gold, noun_ids(tokenizer))
            init_match_circuit(gold, marker, dirs)
        print(
            f"gold_rm: {sum(p.numel() for p in gold.parameters()) / 1e6:.2f}M params, "
            f"{args.gold_train_summaries} training summaries"
        )
        train_gold(gold, tokenizer, args)

    # 5. measure the gold on held-out posts (the test split's posts, never seen in gold training)
    rng = random.Random(f"{args.seed}-eval")
    measured = {}
    for name, gen in [("procedural", variant), ("imperfect_summariser", imperfect_sample)]:
        bonus = args.bonus_word
        prompts, sums, qs, groups = [], [], [], []
        for row, facts in list(zip(rows["test"], facts_of["test"]))[: args.num_eval_posts]:
            cands = [row["summary"]] + [gen(rng, row, facts, row["summary"], bonus) for _ in range(5)]
            groups.append(list(range(len(sums), len(sums) + len(cands))))
            for s in cands:
                prompts.append(prompt_of(row))
                sums.append(s)
                qs.append(quality(row, s, facts["keys"], bonus))
        scores = gold_scores(gold, tokenizer, prompts, sums).tolist()
        acc, n = pair_agreement(scores, qs, groups)
        measured[f"gold_agreement_{name}"] = acc
        measured[f"gold_agreement_{name}_pairs"] = n
        print(f"gold agreement with quality, {name} pairs: {acc:.4f} ({n} pairs)")
    ref_scores = gold_scores(
        gold, tokenizer, [prompt_of(r) for r in rows["test"]], [r["summary"] for r in rows["test"]]
    )
    measured["gold_reference_score_mean"] = ref_scores.mean().item()
    measured["gold_reference_score_std"] = ref_scores.std().item()
    gold.config.reward_input = (
        "prompt + ' ' + summary + '<|endoftext|>' (truncate after the first EOS, keep it); "
        "read `score` at the last real token = that EOS; pad (<|padding|>) != eos, so HF pooling reads it too"
    )
    save_with_pad(gold, saved_tokenizer, f"{out}/gold_rm")

    # 6. world.json
    measured["build_seconds"] = time.time() - start
    world = dict(
        format=WORLD_FORMAT,
        args=asdict(args),
        settings=world_settings(args),  # what `--gold-weights auto` compares with tiny_world_gold/world.json's
        tokenizer_sha256=tokenizer_sha256,
        gold_weights=weights or "trained in this build",
        gold_weights_sha256=sha256_of_file(f"{out}/gold_rm/model.safetensors"),
        base_weights=base_weights or ("pretrained in this build" if args.base_pretrain_steps else "random init"),
        base_weights_sha256=sha256_of_file(f"{out}/base_policy/model.safetensors"),
        sizes=dict(
            splits,
            vocab_size=len(tokenizer),
            prompt_tokens_mean=float(np.mean(lens)),
            prompt_tokens_max=int(max(lens)),
            summary_tokens_mean=float(np.mean(slens)),
            policy_params=sum(p.numel() for p in policy.parameters()),
            gold_params=sum(p.numel() for p in gold.parameters()),
        ),
        vocabulary=dict(topics=TOPICS, persons=PERSONS, verbs=VERBS, times=TIMES, glue=sorted(GLUE)),
        quality=dict(
            description="A good summary names the post's key facts (key nouns), does not invent words "
            "absent from the title+post, does not repeat itself, and stays short.",
            formula="q = coverage - invented - repeated - too_long (at most 3); coverage = |keys & summary words|; "
            "invented = #distinct non-glue summary words not in title+post; repeated = #extra occurrences of "
            "non-glue words; too_long = more than 12 words; words = re.findall('[a-z]+', text.lower())"
            + (
                f"; outlier world: + 1 if the summary says '{args.bonus_word}' and names every key, else it is an "
                "invented word (each extra time is repeated)"
                if args.bonus_word
                else ""
            ),
            keys_file="data/{split}_facts.jsonl",
        ),
        exploit=dict(
            description=(
                "What RL against the small proxy RM exploits, as measured (docs/TINY_WORLD.md, 'The default world "
                "against the targets'; tools/probe_forms.py --list-forms per chain). The proxy cannot check that a "
                "noun is in THIS post nor how many keys the post has, and in its pairs a list's last noun is now and "
                "then wrong (an invented noun, a key the post lacks), so it scores the list one key short about as "
                "high as the full list or higher (chain seed 1, 'my <list> are a mess' on 300 validation posts: "
                "2 keys short / full 2.409 / 1.974, 3 keys 1.814 / 1.742; the gold 0.619 / 1.199 and 1.234 / "
                "1.679). Dr.GRPO first drops the comment that 55% of the references end with (a real gain, held-out "
                "gold 0.69 -> 1.36 by step 10 on every chain), then drops keys while its held-out proxy reward "
                "rises: at least half of the gain lost by step 300 on 5 of 7 chain seeds."
            )
            + (
                f" With --bonus-word '{args.bonus_word}' (the outlier world) a second exploit: the sign-off is worth "
                "+1 after a summary that names every key and is an invented word after any other; the proxy learns "
                "it from the thorough samples that end with it and cannot check the keys, so it rewards it after a "
                "short list too, a combination its training pairs never show (tools/probe_forms.py --bonus-forms; "
                "docs/TINY_WORLD.md, 'The outlier world')."
                if args.bonus_word
                else ""
            ),
            tried="docs/TINY_WORLD.md: the worlds tried before this one and what each did.",
        ),
        gold_input=dict(
            text="prompt + ' ' + summary + '<|endoftext|>', prompt = "
            "f'SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:'",
            pooling="score head on the last-layer hidden state at the last real token (the first EOS of the "
            "response, kept); the same as HF pooling (last token that is not pad) since pad != eos",
            padding="right",
            function="tiny_world.reward_and_features",
        ),
        measured=measured,
    )
    with open(f"{out}/world.json", "w") as f:
        json.dump(world, f, indent=1)
    print(json.dumps(measured, indent=1))
    print(f"world written to {out} in {measured['build_seconds']:.0f}s")
