"""``blackbird demo``: a scripted tour of Blackbird on an embedded server in an empty folder.

Each step prints what it does and what came back, rendered with rich: sessions, usage against a
quota, a quota refusal, rate limiting, concurrency slots, a conversation with the offline
development agent that learns a fact, a second session that recalls it, a live stream of a
session's messages, and an audit of what happened, read back from the log. Everything runs in
this process against ``AsyncBlackbird(data_dir=folder)``; nothing is faked, and every refusal
shown is the typed error the SDK raised.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table

from actors.policy import QuotaType, RateLimitType
from blackbird._client import AsyncBlackbird
from blackbird.errors import BlackbirdError, RateLimitError

__all__ = ["run_demo"]

USER = "ada"
OTHER_USER = "bob"
FACT = "My name is Ada and I live in Paris"
QUESTION = "Where do I live?"
LEARN_TIMEOUT = 30.0  # seconds the learner gets to turn the fact into a memory


async def run_demo(data_dir: Path, console: Console) -> None:
    """Run the tour against an embedded nats-server whose data lives in ``data_dir``.

    ``data_dir`` should be empty (the tour creates users and sessions and expects its numbers);
    raises BlackbirdError if a step fails for a reason the tour does not show on purpose.
    """
    started = time.perf_counter()
    console.rule("[bold]Blackbird demo")
    console.print(f"data folder: {data_dir}  (an embedded nats-server; every step is an event in its log)")
    async with AsyncBlackbird(data_dir=data_dir, tenant="demo") as bb:
        tour = _Tour(bb, console)
        await tour.sessions()
        await tour.usage()
        await tour.quota_refusal()
        await tour.rate_limiting()
        await tour.concurrency()
        await tour.conversation()
        await tour.recall_in_second_session()
        await tour.live_stream()
        await tour.audit()
    console.rule()
    console.print(f"[bold green]demo finished[/] in {time.perf_counter() - started:.1f} s")


class _Tour:
    """The steps of the demo, sharing one client and the sessions they create."""

    def __init__(self, bb: AsyncBlackbird, console: Console) -> None:
        self.bb = bb
        self.console = console
        self.pro = ""  # ada's first session (tier pro)
        self.free = ""  # bob's session (tier free), where the refusals happen
        self.second = ""  # ada's second session

    def step(self, title: str, what: str) -> None:
        self.console.print()
        self.console.rule(f"[bold cyan]{title}", align="left")
        self.console.print(what, style="dim")

    def refused(self, exc: BlackbirdError, prefix: str = "") -> None:
        self.console.print(f"  {prefix}[red]refused[/] {type(exc).__name__}: {exc.message}")

    async def sessions(self) -> None:
        self.step("1. Sessions", "Each session is an event-sourced actor; creating one appends SessionCreated.")
        sm = self.bb.session_manager
        pro = await sm.create_session(USER, tier="pro", metadata={"team": "research"})
        free = await sm.create_session(OTHER_USER, tier="free")
        self.pro, self.free = pro.session_id, free.session_id
        table = Table("session", "user", "tier", "status", "active")
        for s in (pro, free):
            table.add_row(s.session_id, s.user_id, s.tier, str(s.status), str(s.is_active))
        self.console.print(table)

    async def usage(self) -> None:
        self.step("2. Usage", "track_usage charges a quota; get_quota reads what is left.")
        sm = self.bb.session_manager
        await sm.track_usage(self.pro, "ai_inference", QuotaType.TOKENS, 1_500)
        await sm.track_usage(self.pro, "ai_inference", QuotaType.API_CALLS, 1)
        quota = await sm.get_quota(self.pro)
        table = Table("quota", "used", "limit", "remaining")
        for name in ("tokens", "api_calls"):
            q = quota[name]
            table.add_row(name, f"{q['used']:,g}", f"{q['limit']:,g}", f"{q['remaining']:,g}")
        self.console.print(table)

    async def quota_refusal(self) -> None:
        self.step("3. A quota refusal",
                  f"The free tier allows 10,000 tokens a day; {OTHER_USER} asks for 20,000 (QuotaDenied).")
        try:
            await self.bb.session_manager.track_usage(self.free, "ai_inference", QuotaType.TOKENS, 20_000)
        except BlackbirdError as exc:
            self.refused(exc)
        else:
            self.console.print("  [yellow]unexpectedly allowed")

    async def rate_limiting(self) -> None:
        self.step("4. Rate limiting", "The free tier allows 1 api_call a second (a sliding window): three in a row.")
        for i in range(1, 4):
            try:
                await self.bb.session_manager.enforce_rate_limit(self.free, "api_call", RateLimitType.PER_SECOND)
                self.console.print(f"  call {i}: [green]allowed")
            except RateLimitError as exc:
                retry = exc.retry_after or 0.0
                self.console.print(f"  call {i}: [red]refused[/] RateLimitError: retry after {retry:.2f} s")

    async def concurrency(self) -> None:
        self.step("5. Concurrency", "The free tier holds 1 slot per operation: a second report job waits its turn.")
        sm = self.bb.session_manager
        async with sm.concurrency_slot(self.free, "report"):
            self.console.print("  job 1: [green]slot acquired[/] (a lease with a fencing token)")
            try:
                await sm.manage_concurrency(self.free, "report", True)
                self.console.print("  job 2: [yellow]unexpectedly acquired")
            except BlackbirdError as exc:
                self.refused(exc, "job 2: ")
        self.console.print("  job 1 done: slot released (SlotReleased)")

    async def conversation(self) -> None:
        self.step("6. A conversation that learns",
                  "send_message admits the call under the session's quotas, gives the development agent "
                  "(offline, answers from recalled memories) its context, persists the reply; the learner "
                  "turns the user's first-person statements into user-scope memories.")
        self.console.print(f"  [bold]{USER}:[/] {FACT}")
        reply = await self.bb.send_message(FACT, self.pro)
        self.console.print(f"  [bold]agent:[/] {reply.text}")
        self.console.print(f"  [dim]usage {reply.usage.prompt_tokens}+{reply.usage.completion_tokens} tokens, "
                           f"reply at sequence {reply.sequence}[/]")
        t0 = time.perf_counter()
        await self.bb.learning.caught_up(reply.sequence, LEARN_TIMEOUT)
        self.console.print(f"  learner caught up in {1000 * (time.perf_counter() - t0):.0f} ms")

    async def recall_in_second_session(self) -> None:
        self.step("7. A second session recalls it",
                  f"A new session of {USER}; the agent is given memories recalled from her user scope, "
                  "and the reply records which (so 'why did the agent say this' is in the log).")
        second = await self.bb.session_manager.create_session(USER, tier="pro")
        self.second = second.session_id
        self.console.print(f"  new session {self.second}")
        self.console.print(f"  [bold]{USER}:[/] {QUESTION}")
        self.console.print("  [bold]agent:[/] ", end="")
        stream = self.bb.stream_message(QUESTION, self.second)
        async for piece in stream:
            self.console.print(piece, end="", markup=False)
        self.console.print()
        reply = stream.reply
        self.console.print(f"  [dim]the agent was given {len(reply.memory_ids)} recalled memories and "
                           f"{len(reply.message_ids)} earlier messages (recorded with the reply)[/]")
        memories = await self.bb.memory.recall("where does the user live", session_id=self.second, k=3)
        for memory in memories:
            self.console.print(f"  remembered ({memory.scope}): {memory.text}")

    async def live_stream(self) -> None:
        self.step("8. A live stream",
                  "A subscriber follows the session's messages (NATS here; SSE over HTTP) while they are posted.")
        received: list[str] = []
        posts = ["build started", "tests passed", "deployed"]
        async with self.bb.streams.subscribe(self.second, channels=["status"]) as messages:
            await messages.caught_up()
            async with anyio.create_task_group() as tg:

                async def post() -> None:
                    for text in posts:
                        await self.bb.session_manager.send_message(text, session_id=self.second, channel="status")

                tg.start_soon(post)
                with anyio.fail_after(10):
                    async for event in messages:
                        received.append(event.text)
                        self.console.print(f"  [magenta]<- {event.channel}[/] {event.text}  [dim](id {event.id})[/]")
                        if len(received) == len(posts):
                            break

    async def audit(self) -> None:
        self.step("9. An audit of what happened",
                  f"Replayed from the log: every command on {OTHER_USER}'s session, allowed or refused, and why.")
        report = await self.bb.audit.replay(session_id=self.free)
        table = Table("seq", "what", "decision", "why", show_lines=False)
        for row in report.rows:
            style = "red" if row.decision == "refused" else None
            table.add_row(str(row.seq), "; ".join(row.what), row.decision, row.why or "", style=style)
        self.console.print(table)
        ada = await self.bb.audit.replay(user_id=USER)
        refused = sum(1 for row in ada.rows if row.decision == "refused")
        self.console.print(f"  {USER}: {len(ada.rows)} commands over her sessions, {refused} refused "
                           f"(`blackbird audit --user {USER}` shows them all)")
