"""A batch budget no utterance fits is named, with its setting, value and the shortest utterance
(common.data.loading.check_batch_budget, run by the data module before validation)."""

import pytest
from lhotse.testing.dummies import dummy_cut, dummy_supervision

from common.data.loading import TokenBudget, check_batch_budget
from common.data.tokenizer import WordTokenizer
from common.errors import ConfigError


def _cuts(durations):
    return [dummy_cut(i, duration=d, supervisions=[dummy_supervision(i, duration=d, text="alpha bravo")])
            for i, d in enumerate(durations)]


def test_each_budget_names_its_setting_and_the_shortest_utterance():
    cuts = _cuts([3.0, 2.5, 4.0])
    check_batch_budget(cuts, max_duration_s=3.0)  # one fits: nothing to say
    with pytest.raises(ConfigError, match=r"^data\.max_duration_s is 2 s .* the shortest of the first 3 training "
                                          r"utterances lasts 2\.50 s: no utterance fits; raise data\.max_duration_s"):
        check_batch_budget(cuts, max_duration_s=2.0)
    with pytest.raises(ConfigError, match=r"^data\.max_utterance_s is 1\.5 s .*lasts 2\.50 s.*raise data\.max_utterance_s"):
        check_batch_budget(cuts, max_duration_s=600.0, max_utterance_s=1.5)
    # speech-LLM batches bounded by LLM positions: 2.5 s = 250 frames / 8 = 32 positions + 2 words + 2
    budget = TokenBudget(WordTokenizer.build(["alpha bravo"]), audio_frames_per_token=8)
    check_batch_budget(cuts, max_duration_s=600.0, token_budget=budget, max_tokens=36)
    with pytest.raises(ConfigError, match=r"^data\.max_tokens is 35 LLM positions .* needs 36 .*raise data\.max_tokens"):
        check_batch_budget(cuts, max_duration_s=600.0, token_budget=budget, max_tokens=35)
    check_batch_budget([], max_duration_s=1.0)  # no items at all: the data checks say so, not this
