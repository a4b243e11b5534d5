"""bench.salm_errors: which reference words each of two transcripts gets right."""

from bench.salm_errors import compare, word_outcomes


def test_each_reference_word_is_right_only_where_the_alignment_matches_it():
    assert word_outcomes("add the given payload", "add the given payload") == [True] * 4
    assert word_outcomes("add the given payload", "add given paled") == [True, False, True, False]
    assert word_outcomes("attach the watcher", "alternate the word to") == [False, True, False]
    assert word_outcomes("a b", "") == [False, False]


def test_compare_counts_words_right_in_both_one_or_neither():
    refs = ["reset the input buffer", "the time may be absent"]
    recognizer = ["reset the input buffer", "the time may be absn"]
    salm = ["set the input buffer", "the term may be absent"]
    assert compare(refs, recognizer, salm) == {"both": 6, "first_only": 2, "second_only": 1, "neither": 0}
