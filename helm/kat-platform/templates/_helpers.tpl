{{/* Names: release-scoped for the services, fixed (from values) for what the pipeline refers to. */}}
{{- define "kat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kat.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains (include "kat.name" .) .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kat.name" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kat.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kat.labels" -}}
{{ include "kat.selectorLabels" . }}
app.kubernetes.io/part-of: kat
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kat.image" -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .Values.image.registry) .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The S3 endpoint every client uses: the bundled store's service, the external endpoint, or AWS S3. */}}
{{- define "kat.s3Endpoint" -}}
{{- if eq .Values.objectStore.mode "bundled" -}}
{{- printf "http://%s-s3.%s.svc.cluster.local:8333" (include "kat.fullname" .) .Release.Namespace -}}
{{- else if .Values.objectStore.endpoint -}}
{{- trimSuffix "/" .Values.objectStore.endpoint -}}
{{- else -}}
{{- printf "https://s3.%s.amazonaws.com" .Values.objectStore.region -}}
{{- end -}}
{{- end -}}

{{- define "kat.mlflowUri" -}}
{{- printf "http://%s-mlflow.%s.svc.cluster.local:%v" (include "kat.fullname" .) .Release.Namespace .Values.mlflow.port -}}
{{- end -}}

{{/* S3 credentials from the object store's Secret: referenced, never copied into a manifest. */}}
{{- define "kat.s3Env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ required "objectStore.existingSecret is required: a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" .Values.objectStore.existingSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.objectStore.existingSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end -}}

{{- define "kat.podDefaults" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
