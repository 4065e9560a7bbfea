"""`openflamingo serve`: an OpenAI-compatible HTTP API and chat page over a saved Flamingo model.

- `app.py`: the routes (FastAPI), authentication and the OpenAI error shape;
- `protocol.py` + `images.py`: request parsing and validation, each error naming the field that was wrong;
- `engine.py` + `batch.py` + `sampling.py` + `completion.py`: the one thread that runs the model, decoding many
  requests as one left-padded batch with each request's KV cache and image keys/values computed once;
- `static/chat.html`: the chat page, one file with no build step.
"""
