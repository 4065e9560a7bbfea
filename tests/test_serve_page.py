"""The chat page in a real headless Chromium: attach a PNG, ask, see the streamed answer; the second turn is asked
with the first (its image and answer) as context; a screenshot is saved in the test's temp dir."""

from __future__ import annotations

import pytest
from serving import (
    ask_in_page,
    chromium_missing,
    one_thread,  # noqa: F401 (an autouse fixture: tiny models run on one thread)
    png_bytes,
    running_server,
    settings,
    start_chromium,
    tiny_model,
)

from openflamingo.model.prompt_format import END_OF_CHUNK, MEDIA


@pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))
def test_chat_page_streams_answers_and_keeps_earlier_turns_as_context(tokenizer_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = tiny_model(tokenizer_dir)
    (tmp_path / "red.png").write_bytes(png_bytes((220, 30, 30), (64, 64)))
    with running_server(model, settings(model)) as (url, engine):
        jobs = []
        submit = engine.submit
        engine.submit = lambda job: (jobs.append(job), submit(job))[1]
        driver = start_chromium()
        try:
            driver.get(url + "/")
            WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "model").text == "tiny-flamingo")
            first = ask_in_page(driver, "what color is the shape", [tmp_path / "red.png"])
            assert first.strip(), "the streamed answer never appeared"
            second = ask_in_page(driver, "and what shape is it")
            driver.save_screenshot(str(tmp_path / "chat.png"))
            users = driver.find_elements(By.CSS_SELECTOR, ".msg.user")
            assert [u.text for u in users] == ["what color is the shape", "and what shape is it"]
            assert len(users[0].find_elements(By.TAG_NAME, "img")) == 1
            driver.find_element(By.ID, "reset").click()
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg")
        finally:
            driver.quit()
    assert (tmp_path / "chat.png").stat().st_size > 10_000
    assert len(jobs) == 2 and second is not None
    context = model.tokenizer.decode(jobs[1].input_ids)
    # The second prompt holds the first turn: its image, its question and the answer closed by <|endofchunk|>.
    assert context.count(MEDIA) == 1 and jobs[1].images.shape[1] == 1
    assert "what color is the shape" in context and context.count(END_OF_CHUNK) == 1
    assert context.rstrip().endswith("and what shape is it Short answer:")
