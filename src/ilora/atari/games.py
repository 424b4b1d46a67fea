"""The game catalog: environment ids, rules text for the prompt, reference scores, action meanings.

Reference scores are the standard per-game random and human scores used across the Atari
literature (DQN, Atari-100k/SPR/DreamerV3 tables, and the I-LoRA paper's Table 1), so the
human-normalised score ``(agent - random) / (human - random)`` is comparable with published
numbers. The rules are short paraphrases of the manuals, written for the prompt: the objective,
how points are scored, what ends a life.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ilora.errors import IloraError

# Sticky actions: v5's default (Machado et al., 2018). With 0.25 the emulator repeats the previous
# action with that probability on every frame, so a policy cannot memorise one trajectory; 0.0
# gives the deterministic v4-style emulator. The benchmark uses v5's default; it is an option.
DEFAULT_REPEAT_ACTION_PROBABILITY = 0.25
DEFAULT_FRAME_SKIP = 4
# The paper's episode cap: 30 minutes of game time at 60 frames/s.
DEFAULT_MAX_EPISODE_FRAMES = 108_000


@dataclass(frozen=True)
class Game:
    """One catalogued Atari game.

    Attributes:
        name: The ALE name, e.g. ``"Pong"``; the environment id is ``ALE/<name>-v5``.
        rules: The rules text shown in the prompt.
        random_score: Mean score of a uniformly random policy (literature reference).
        human_score: Human reference score (literature reference).
        atari100k: Whether the game is one of the 26 Atari-100k games.
        point_loss_ends_rally: A negative reward is a lost point (Pong, Tennis): collection treats
            it like a lost life when dropping the frames that lead into a failure.
    """

    name: str
    rules: str
    random_score: float
    human_score: float
    atari100k: bool = True
    point_loss_ends_rally: bool = False

    @property
    def env_id(self) -> str:
        return f"ALE/{self.name}-v5"

    @property
    def action_names(self) -> tuple[str, ...]:
        """The minimal action set's meanings, as the environment reports them."""
        return action_meanings(self.name)

    def human_normalized(self, score: float) -> float:
        """``(score - random) / (human - random)``."""
        return (score - self.random_score) / (self.human_score - self.random_score)


def _g(name: str, random: float, human: float, rules: str, **kw) -> Game:
    return Game(name=name, rules=" ".join(rules.split()), random_score=random, human_score=human, **kw)


_CATALOG = (
    # The 26 Atari-100k games (the paper's sixteen are among them).
    _g("Alien", 227.8, 7127.7, """You walk the corridors of a spaceship, crushing alien eggs (dots) for points.
       Aliens chase you; touching one costs a life unless you just ate a pulsar, which lets you
       destroy aliens for bonus points. FIRE uses the flamethrower to scare aliens briefly."""),
    _g("Amidar", 5.8, 1719.5, """You move along a grid, painting its segments; each new segment scores and
       painting all four sides of a box fills it for bonus points. Enemies patrol the grid; touching
       one costs a life. FIRE (limited uses) makes enemies jump so you can pass under them."""),
    _g("Assault", 222.4, 742.0, """You drive a cannon along the bottom and shoot the attackers that a
       mother ship releases; each destroyed attacker scores. UP fires upward, RIGHTFIRE/LEFTFIRE fire
       sideways. Getting hit, or letting the cannon overheat from firing too much, costs a life."""),
    _g("Asterix", 210.0, 8503.3, """You are Asterix, moving between eight horizontal lanes. Collect the
       objects (cauldrons, helmets, shields...) that scroll across for points; touching a lyre costs
       a life. Move up, down, left and right to catch objects and dodge lyres."""),
    _g("BankHeist", 14.2, 753.1, """You drive a getaway car through a city maze robbing banks for points.
       Police cars appear after a robbery; FIRE drops dynamite behind you to destroy them for points.
       Colliding with police, running out of fuel or being caught by your own dynamite costs a life."""),
    _g("BattleZone", 2360.0, 37187.5, """You drive a tank in a first-person 3D battlefield. Destroy enemy
       tanks, supertanks, fighters and saucers with FIRE for points; the radar shows where enemies
       are. Being hit by an enemy shot costs a life."""),
    _g("Boxing", 0.1, 12.1, """Top-down boxing: you are the white boxer, the opponent is black. Punch with
       FIRE when the opponent is within reach and one of your gloves (top or bottom of your boxer) is
       in line with the opponent: each landed punch scores a point, a close power punch two. The round lasts two minutes or ends at 100 points; the score is
       your points minus the opponent's."""),
    _g("Breakout", 1.7, 30.5, """Move the paddle at the bottom left and right to bounce the ball into the
       wall of bricks at the top; each brick broken scores (higher rows score more). Press FIRE to
       launch a ball when none is in play. Letting the ball pass the paddle costs one of five lives."""),
    _g("ChopperCommand", 811.0, 7387.8, """You fly a helicopter protecting a truck convoy. Shoot enemy jets
       and helicopters with FIRE for points and dodge their bullets; colliding with an aircraft or
       being shot costs a life. The game ends when all lives or all trucks are lost."""),
    _g("CrazyClimber", 10780.5, 35829.4, """You climb the face of a skyscraper by moving up window by
       window; climbing scores points and reaching the roof's helicopter finishes the building for a
       bonus. Closing windows, falling objects and enemies can knock you off, costing a life."""),
    _g("DemonAttack", 152.1, 1971.0, """You command a laser cannon on the planet's surface. Shoot the
       winged demons that swoop above with FIRE; each demon destroyed scores. Being hit by a demon's
       shot or by a diving demon costs a life."""),
    _g("Freeway", 0.0, 29.6, """Guide the chicken up across ten lanes of traffic. Each crossing to the top
       scores one point and the chicken starts again at the bottom. Being hit by a car pushes the
       chicken back down a lane; no lives are lost. The game lasts 2 minutes 16 seconds."""),
    _g("Frostbite", 65.2, 4334.7, """You are Frostbite Bailey, jumping up and down between rows of ice floes.
       Jumping on white floes turns them blue, scores and adds a block to your igloo; enter the
       finished igloo for a bonus. Falling into the water, being carried off screen, meeting a bear
       or freezing when the temperature reaches zero costs a life."""),
    _g("Gopher", 257.6, 2412.5, """You are a farmer protecting three carrots from a gopher that digs
       tunnels. Fill holes and bonk the gopher with your shovel (FIRE) for points. The game ends when
       the gopher has eaten all carrots."""),
    _g("Hero", 1027.0, 30826.4, """You are R.H.E.R.O., flying down mine shafts with a helicopter backpack to
       rescue trapped miners. Shoot creatures with the helmet laser (FIRE), blast walls with dynamite
       (DOWN when standing); points for creatures, walls and rescues. Touching a creature, lava or
       your own dynamite, or running out of power costs a life."""),
    _g("Jamesbond", 29.0, 302.8, """You drive James Bond's multi-purpose vehicle over a scrolling landscape,
       jumping craters (UP) and shooting (FIRE) at satellites, helicopters and boats for points.
       Being hit or falling into a crater costs a life."""),
    _g("Kangaroo", 52.0, 3035.0, """You are a mother kangaroo climbing ladders to rescue her baby at the top.
       Punch (FIRE) monkeys and the apples they throw for points, jump over low apples, collect fruit
       for bonus points. Being hit by an apple or touching a monkey costs a life."""),
    _g("Krull", 1598.0, 2665.5, """You are Colwyn on a quest across several scenes: fight the Slayers (FIRE
       swings your sword) to protect the wedding, ride across the land, and rescue Lyssa. Points for
       defeating enemies and finishing scenes; losing a fight costs a life."""),
    _g("KungFuMaster", 258.5, 22736.3, """You are Thomas walking through a temple floor by floor to rescue
       Sylvia. Kick and punch (FIRE with a direction) the attackers for points; crouch (DOWN) or jump
       (UP) to dodge. Losing all energy or running out of time costs a life."""),
    _g("MsPacman", 307.3, 6951.6, """Guide Ms. Pac-Man through the maze eating dots for points. Ghosts chase
       her: touching one costs a life, unless she has just eaten a power pill, after which ghosts turn
       blue and can be eaten for bonus points. Fruit gives bonus points."""),
    _g("Pong", -20.7, 14.6, """You control the green paddle on the right; the computer plays the orange paddle
       on the left. Move your paddle up and down to hit the ball back. You score a point when the
       ball passes the opponent's paddle, the opponent scores when it passes yours. The first to 21
       wins; the score is your points minus the opponent's.""", point_loss_ends_rally=True),
    _g("PrivateEye", 24.9, 69571.3, """You are detective Pierre Touché driving through the city to find
       clues and the stolen items and return them. Points for finding clues and returning items; jump
       (UP) over obstacles. Being hit by thugs or objects costs points and time."""),
    _g("Qbert", 163.9, 13455.0, """You are Q*bert hopping diagonally on a pyramid of cubes; each hop onto a
       cube changes its colour and scores; turn all cubes to the target colour to finish the round.
       Jumping off the pyramid or touching a red ball or Coily costs a life."""),
    _g("RoadRunner", 11.5, 7845.0, """You are the Road Runner running left along the road. Eat birdseed for
       points and stay away from Wile E. Coyote, trucks and traps. Being caught by the coyote, hit by
       a truck or missing five seed piles in a row costs a life."""),
    _g("Seaquest", 68.4, 42054.7, """You pilot a submarine: shoot sharks and enemy subs (FIRE) for points and
       rescue divers. Surface before the oxygen runs out; surfacing with six divers scores a bonus.
       Being hit, running out of oxygen or surfacing with no diver costs a life."""),
    _g("UpNDown", 533.4, 11693.2, """You drive a buggy along a winding road of hills. Collect flags for points
       and jump (FIRE) onto other vehicles to crush them for points. Colliding with a vehicle without
       jumping on it, or landing off the road, costs a life."""),
    # Further classics, outside Atari-100k.
    _g("Asteroids", 719.1, 47388.7, """You pilot a ship in an asteroid field: rotate, thrust (UP) and shoot
       (FIRE). Shooting an asteroid splits it and scores; small ones score most. Colliding with an
       asteroid or a UFO's shot costs a life.""", atari100k=False),
    _g("Atlantis", 12850.0, 29028.1, """You defend the city of Atlantis with three cannons (FIRE shoots from
       the centre, RIGHTFIRE/LEFTFIRE from the sides). Shoot the enemy ships crossing the sky for
       points before they destroy the city's installations. The game ends when the city falls.""",
       atari100k=False),
    _g("Bowling", 23.1, 160.7, """Ten-pin bowling: move the bowler up and down, release the ball with FIRE
       and steer it once. Points follow bowling rules; a game is ten frames.""", atari100k=False),
    _g("Enduro", 0.0, 860.5, """A day-long car endurance race: accelerate (FIRE), steer left and right and
       pass cars. Each car passed scores; pass the day's quota to continue. Collisions slow you down.""",
       atari100k=False),
    _g("SpaceInvaders", 148.0, 1668.7, """Move the laser cannon left and right along the bottom and shoot
       (FIRE) the rows of descending invaders for points; the mystery ship scores a bonus. Being hit by
       an invader's bomb costs a life; invaders reaching the ground end the game.""", atari100k=False),
    _g("Tennis", -23.8, -8.3, """You play tennis against the computer, moving your player to the ball; hits
       are automatic when you reach it. Winning a point scores for you, losing one scores for the
       opponent; the score is your points minus the opponent's.""", atari100k=False,
       point_loss_ends_rally=True),
)

GAMES: dict[str, Game] = {game.name: game for game in _CATALOG}
_BY_KEY = {name.lower(): game for name, game in GAMES.items()}


def get_game(name: str | Game) -> Game:
    """Look a game up by name (case-insensitive; ``"pong"``, ``"Pong"`` and ``"ALE/Pong-v5"`` all work).

    Raises:
        IloraError: The name is not catalogued; the message lists the known names.
    """
    if isinstance(name, Game):
        return name
    key = name.strip()
    if key.startswith("ALE/"):
        key = key[len("ALE/"):].split("-v")[0]
    game = _BY_KEY.get(key.lower())
    if game is None:
        raise IloraError(f"unknown game {name!r}; known games: {', '.join(sorted(GAMES))}")
    return game


def parse_games(spec: str | list[str]) -> list[Game]:
    """``"Pong,Breakout"`` or ``["Pong", "Breakout"]`` -> games, each checked with :func:`get_game`."""
    names = spec.split(",") if isinstance(spec, str) else spec
    return [get_game(n) for n in names if n.strip()]


@functools.lru_cache(maxsize=None)
def action_meanings(name: str, full_action_space: bool = False) -> tuple[str, ...]:
    """The action names the environment reports (index = action id), cached per game."""
    env = make_env(name, full_action_space=full_action_space)
    try:
        return tuple(env.unwrapped.get_action_meanings())
    finally:
        env.close()


def make_env(
    game: str | Game,
    seed: int | None = None,
    *,
    frame_skip: int = DEFAULT_FRAME_SKIP,
    full_action_space: bool = False,
    repeat_action_probability: float = DEFAULT_REPEAT_ACTION_PROBABILITY,
    max_episode_frames: int = DEFAULT_MAX_EPISODE_FRAMES,
    render_mode: str | None = None,
):
    """Create the game's ALE v5 environment; observations are the native 210x160 RGB frames.

    Args:
        game: A catalogued game or its name.
        seed: If given, the environment is reset once with it, so later ``reset()`` calls without a
            seed continue a deterministic sequence. Pass ``reset(seed=...)`` per episode for
            episodes that are reproducible on their own (collection does).
        frame_skip: Emulator frames per agent step (the action is repeated, rewards summed).
        full_action_space: Use all 18 actions instead of the game's minimal set.
        repeat_action_probability: Sticky-action probability (v5 default 0.25; 0.0 = deterministic).
        max_episode_frames: Truncate an episode after this many emulator frames (paper: 108,000).
        render_mode: Passed to gymnasium (``"rgb_array"`` for videos).

    Returns:
        The gymnasium environment.
    """
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    if frame_skip < 1:
        raise IloraError(f"frame_skip must be >= 1, got {frame_skip}")
    if not 0.0 <= repeat_action_probability <= 1.0:
        raise IloraError(f"repeat_action_probability must be in [0, 1], got {repeat_action_probability}")
    env = gym.make(
        get_game(game).env_id,
        frameskip=frame_skip,
        full_action_space=full_action_space,
        repeat_action_probability=repeat_action_probability,
        max_num_frames_per_episode=max_episode_frames,
        render_mode=render_mode,
    )
    if seed is not None:
        env.reset(seed=seed)
    return env
