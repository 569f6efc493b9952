"""Reading original PIIP config files without running them.

The original configs are Python files (``model = dict(backbone=dict(...))``). Executing a
downloaded file would run whatever it contains, so this evaluates only literals, ``dict(...)``
calls (``**`` merges included), arithmetic on numbers of bounded size and names assigned earlier
in the same file.
"""
import ast
import json
import operator
from pathlib import Path
from typing import Any, Dict, Mapping, Union

__all__ = ['read_backbone_config']

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
# Integers a config may compute: enough for any size or count, small enough that a hostile file
# cannot make the reader spend minutes or gigabytes on 9 ** 9 ** 9 or on squaring a name again and again.
_MAX_INT_BITS = 256


def _arithmetic(op: ast.operator, left: Any, right: Any, where: str) -> Any:
    if not all(isinstance(v, (int, float)) for v in (left, right)):
        raise ValueError(f'{where}: arithmetic only on numbers is supported.')
    if isinstance(left, int) and isinstance(right, int):
        bits = {ast.Mult: left.bit_length() + right.bit_length(),
                ast.Pow: left.bit_length() * max(right, 0)}.get(type(op), 0)
        if bits > _MAX_INT_BITS:
            raise ValueError(f'{where}: the result would exceed {_MAX_INT_BITS}-bit integers.')
    try:
        return _BINARY[type(op)](left, right)
    except (ArithmeticError, ValueError) as e:  # division by zero, float overflow, ...
        raise ValueError(f'{where}: {e}.') from None


def _merged(pairs: Any, where: str) -> Dict[Any, Any]:
    """A dict from (key, value) pairs in order; a None key spreads a mapping (``**name``)."""
    out: Dict[Any, Any] = {}
    for key, value in pairs:
        if key is None:
            if not isinstance(value, Mapping):
                raise ValueError(f'{where}: ** needs a dict, got {type(value).__name__}.')
            out.update(value)
        else:
            try:
                out[key] = value
            except TypeError:
                raise ValueError(f'{where}: a {type(key).__name__} cannot be a dict key.') from None
    return out


def _evaluate(node: ast.AST, names: Mapping[str, Any], where: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_evaluate(e, names, where) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    line = f'{where}, line {getattr(node, "lineno", "?")}'
    if isinstance(node, ast.Dict):
        return _merged([(None if k is None else _evaluate(k, names, where), _evaluate(v, names, where))
                        for k, v in zip(node.keys, node.values)], line)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict' and not node.args:
        return _merged([(kw.arg, _evaluate(kw.value, names, where)) for kw in node.keywords], line)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, names, where)
        if not isinstance(value, (int, float)):
            raise ValueError(f'{line}: a sign only on numbers is supported.')
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _arithmetic(node.op, _evaluate(node.left, names, where), _evaluate(node.right, names, where), line)
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        raise ValueError(f'{line}: {node.id!r} is not defined earlier in the file.')
    raise ValueError(f'{line}: unsupported expression {type(node).__name__}; only literals and dict(...) are read.')


def _read_python_config(path: Path) -> Dict[str, Any]:
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as e:
        raise ValueError(f'{str(path)!r} is not valid Python (line {e.lineno}: {e.msg}).') from None
    except (MemoryError, RecursionError):  # the parser's answer to absurdly deep nesting
        raise ValueError(f'{str(path)!r} is nested too deeply to read.') from None
    names: Dict[str, Any] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                and isinstance(statement.targets[0], ast.Name):
            name = statement.targets[0].id
            try:
                names[name] = _evaluate(statement.value, names, str(path))
            except RecursionError:
                if name == 'model':
                    raise ValueError(f'{str(path)!r}, line {statement.lineno}: nested too deeply to read.') from None
            except ValueError:
                if name == 'model':
                    raise
    return names


def read_backbone_config(path: Union[str, Path]) -> Dict[str, Any]:
    """``model['backbone']`` of an original config (``.py``) or a JSON file (the backbone dict, or a
    dict with ``model.backbone``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no config file at {str(path)!r}.')
    if path.suffix == '.json':
        config = json.loads(path.read_text())
    elif path.suffix == '.py':
        config = _read_python_config(path)
    else:
        raise ValueError(f'{str(path)!r}: a config must be a .py (original) or .json file.')
    if isinstance(config.get('model'), Mapping) and 'backbone' in config['model']:
        return dict(config['model']['backbone'])
    if any(k.startswith('branch') for k in config):
        return dict(config)
    raise ValueError(f'{str(path)!r} has no model["backbone"] (and is not a backbone dict itself).')
