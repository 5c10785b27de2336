"""Tools stage: run the tool call the model made, append the result, send the job back to inference."""

from __future__ import annotations

import json

from pipeline.job import Job
from pipeline.tools import ToolCall, run_tool
from workers.app import app, task_name
from workers.runtime import Next, publisher, run_stage


def pending_tool_call(job: Job) -> ToolCall:
    message = job.messages[-1]
    calls = message.get("tool_calls") or []
    if message.get("role") != "assistant" or not calls:
        raise ValueError(f"job {job.job_id} reached the tools stage without an assistant tool call")
    function = calls[0]["function"]
    return ToolCall(name=function["name"], arguments=function["arguments"], raw=json.dumps(function))


def execute(job: Job) -> Next:
    call = pending_tool_call(job)
    result = run_tool(call)
    job.messages.append({"role": "tool", "name": call.name, "content": result})
    job.tool_rounds += 1
    publisher().publish(job.job_id, "tool", name=call.name, arguments=json.dumps(call.arguments), result=result)
    return Next("inference", job)


@app.task(name=task_name("tools"))
def tools_task(message: dict) -> None:
    run_stage("tools", message, execute)
