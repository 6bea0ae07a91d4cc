"""Talk to `llama-dist serve` with the official OpenAI client (pip install openai).

    llama-dist serve --model smollm2 &
    python examples/openai_client.py --base_url http://127.0.0.1:8080/v1
"""
import fire
from openai import OpenAI


def main(base_url: str = "http://127.0.0.1:8080/v1", api_key: str = "unused",
         question: str = "What is the capital of France?"):
    client = OpenAI(base_url=base_url, api_key=api_key)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            stream=True, temperature=0)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    fire.Fire(main)
