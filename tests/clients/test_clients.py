"""The libraries people point at an OpenAI-compatible server, unchanged but for the base URL, on the
built-in model: the OpenAI Agents SDK (its default, the Responses API, with a function tool taking a
pydantic argument) and LangChain (bind_tools round trip, with_structured_output)."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel, ConfigDict, Field

from keel.models.loader import DEFAULT_MODEL_NAME as MODEL

pytestmark = pytest.mark.slow  # the built-in model; the fast tier skips these


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=16, description="the city's name")
    country: str = Field(max_length=16)


def test_agents_sdk_default_model_calls_a_pydantic_tool(keel_url):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from agents.exceptions import MaxTurnsExceeded
    from openai import AsyncOpenAI
    set_tracing_disabled(True)
    seen = []

    @function_tool
    def get_weather(city: City) -> str:
        """The weather in a city."""
        seen.append(city)
        return "Sunny, 21 degrees."

    client = AsyncOpenAI(base_url=keel_url, api_key="unused", max_retries=0)
    agent = Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
                  model=OpenAIResponsesModel(model=MODEL, openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0,
                                               max_tokens=120))

    async def run():
        try:
            return await Runner.run(agent, "What is the weather in Paris, France?", max_turns=3)
        except MaxTurnsExceeded:  # the 135M model may keep calling; the call itself is what is checked
            return None
    asyncio.run(run())
    assert seen and all(isinstance(c, City) and c.name for c in seen)


def test_langchain_bind_tools_round_trip_and_structured_output(keel_url):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=keel_url, api_key="unused", model=MODEL, temperature=0, max_tokens=120, max_retries=0)

    class GetWeather(BaseModel):
        """The weather in a city."""
        model_config = ConfigDict(extra="forbid")
        city: City

    ask = HumanMessage("What is the weather in Paris, France?")
    ai = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke([ask])
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(ai.tool_calls[0]["args"])
    answer = llm.invoke([ask, ai, ToolMessage("Sunny, 21 degrees.", tool_call_id=ai.tool_calls[0]["id"])])
    assert isinstance(answer.content, str) and answer.content
    city = llm.with_structured_output(City).invoke("Name a city in Italy and its country.")
    assert isinstance(city, City) and city.name
    raw = json.loads(llm.with_structured_output(City, method="json_mode").invoke(
        "Reply in JSON with keys name and country for a city in Spain.").model_dump_json())
    assert set(raw) == {"name", "country"}


def test_litellm_chat_stream_and_tools(keel_url):
    import litellm
    common = dict(model=f"openai/{MODEL}", api_base=keel_url, api_key="unused", temperature=0, max_tokens=40)
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    r = litellm.completion(messages=ask, **common)
    assert "Paris" in r.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(messages=ask, stream=True, **common))
    assert streamed == r.choices[0].message.content
    tool = {"type": "function", "function": {"name": "get_city", "parameters": City.model_json_schema()}}
    r = litellm.completion(messages=ask, tools=[tool], tool_choice={"type": "function", "function": {"name": "get_city"}},
                           **{**common, "max_tokens": 80})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_city"
    City.model_validate_json(call.function.arguments)


def test_instructor_nested_model_in_tools_mode(keel_url):
    import instructor
    from openai import OpenAI

    class Trip(BaseModel):
        model_config = ConfigDict(extra="forbid")
        destination: City
        days: int = Field(ge=1, le=30)

    client = instructor.from_openai(OpenAI(base_url=keel_url, api_key="unused", max_retries=0),
                                    mode=instructor.Mode.TOOLS)
    trip = client.chat.completions.create(model=MODEL, response_model=Trip, max_retries=0, max_tokens=120,
                                          temperature=0, messages=[{"role": "user", "content":
                                                                    "Plan a short trip to Rome, Italy."}])
    assert isinstance(trip, Trip) and isinstance(trip.destination, City) and trip.destination.name
